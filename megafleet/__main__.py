from megafleet.cli import main

main()
