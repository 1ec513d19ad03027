"""Registry.take_due: the status writer's queue of dirty resources, the oldest write first.

It replaced a scan of every dirty resource on every watch event (a third of the operator's CPU
with 5,000 resources, bench/README.md); these tests pin what the scan did: due means dirty, not
being written, and last written at least status_min_interval ago; the oldest write goes first."""

from __future__ import annotations

from tinv.operator.registry import Registry


def keys(n: int) -> list[tuple[str, str, str]]:
    return [("TextualInversionJob", "ns", f"r{i}") for i in range(n)]


def test_the_oldest_write_first_and_never_written_before_all():
    reg = Registry()
    ks = keys(5)
    reg.last_write.update({ks[0]: 30.0, ks[1]: 10.0, ks[2]: 20.0})  # ks[3], ks[4]: never written
    for k in ks:
        reg.mark(k)
    taken, more = reg.take_due(soon=100.0, limit=3)
    assert taken == [ks[3], ks[4], ks[1]] and more
    taken, more = reg.take_due(soon=100.0, limit=10)
    assert taken == [ks[2], ks[0]] and not more
    assert reg.take_due(100.0, 10) == ([], False)  # taken: not again until marked again


def test_not_due_yet_not_dirty_and_being_written_are_left():
    reg = Registry()
    ks = keys(4)
    reg.last_write.update({ks[0]: 50.0, ks[1]: 5.0, ks[2]: 6.0, ks[3]: 7.0})
    for k in ks:
        reg.mark(k)
    reg.dirty.discard(ks[1])  # written meanwhile, nothing new
    reg.inflight.add(ks[2])  # being written right now
    taken, more = reg.take_due(soon=10.0, limit=10)
    assert taken == [ks[3]] and not more  # ks[0]: written 50 > 10, not due yet
    assert reg.take_due(soon=60.0, limit=10) == ([ks[0]], False)
    # ks[2]'s write ends and it changed meanwhile: marked again, it is due once more
    reg.inflight.discard(ks[2])
    reg.mark(ks[2])
    assert reg.take_due(soon=60.0, limit=10) == ([ks[2]], False)


def test_a_resource_written_since_it_was_filed_waits_for_its_new_time():
    reg = Registry()
    a, b = keys(2)
    reg.mark(a)
    reg.mark(b)
    reg.last_write[a] = 40.0  # written after it was filed (as it was marked: never written)
    assert reg.take_due(soon=30.0, limit=10) == ([b], False)
    assert reg.take_due(soon=45.0, limit=10) == ([a], False)


def test_forgotten_resources_are_dropped_and_can_come_back():
    reg = Registry()
    a, b = keys(2)
    reg.mark(a)
    reg.mark(b)
    reg.forget(a)
    assert reg.take_due(soon=1.0, limit=10) == ([b], False)
    reg.mark(a)  # a new resource of the same name
    assert reg.take_due(soon=1.0, limit=10) == ([a], False)
    assert len(reg._due) == 0 and not reg._filed
