"""The last line of `up` says what is true (pure logic of up.final_line)."""

from megafleet.up import FailedNode, UpSummary, final_line


def summary(**kw):
    base = dict(testbed="mfue", seconds=1.0, guests=120, ready=120, namespaces=4, namespaces_up=4)
    return UpSummary(**{**base, **kw})


def failed(*names):
    return [FailedNode(n, "local", "exited before the ready line") for n in names]


def test_all_up():
    line = final_line(summary())
    assert line.startswith("up: 120 of 120 guests up, 4 of 4 namespace nodes up")
    assert "'megafleet down mfue' removes it" in line


def test_some_failed():
    line = final_line(summary(ready=117, failed=failed(*"abc")))
    assert line.startswith("up with 3 failed nodes (117 of 120 guests up")


def test_every_guest_failed_and_no_namespace_nodes_means_nothing_is_up():
    line = final_line(summary(ready=0, namespaces=0, namespaces_up=0, failed=failed("x") * 120))
    assert line.startswith("nothing is up (120 nodes failed)")
    assert "the testbed stays up" not in line


def test_interrupted():
    assert final_line(summary(ready=68, interrupted=True)).startswith(
        "interrupted: 68 of 120 guests up")
    assert final_line(summary(ready=0, namespaces_up=0, interrupted=True)).startswith(
        "interrupted: nothing is up")


def test_a_failed_ip_batch_names_the_line_it_failed_on():
    from megafleet.netlang import live

    msg = live._batch_failure(["ip"], ["link add mfue-a type bridge", "link add mfue-b type bridge"],
                              "RTNETLINK answers: File exists\nCommand failed -:2\n")
    assert msg == "ip 'link add mfue-b type bridge': RTNETLINK answers: File exists"
