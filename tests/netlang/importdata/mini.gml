graph [
  directed 0
  label "mini"
  node [
    id 0
    label "Amsterdam"
    Latitude 52.37
    Longitude 4.89
  ]
  node [
    id 1
    label "London"
    Latitude 51.51
    Longitude -0.13
  ]
  node [
    id 2
    label "Bus"
    hyperedge 1
  ]
  node [
    id 3
    label "Dublin"
  ]
  edge [
    source 0
    target 1
    LinkLabel "10G"
  ]
  edge [
    source 0
    target 1
  ]
  edge [
    source 1
    target 2
  ]
  edge [
    source 3
    target 2
  ]
]
