"""zeo.buffers.Pool: what it keeps, what it drops, and many threads at
once."""

import itertools
import threading

from zeo.buffers import BufferPool, Pool


def counting_pool(keep):
    numbers = itertools.count()
    return Pool(lambda: [next(numbers)], keep=keep)


def test_the_pool_keeps_its_first_objects_and_drops_spares():
    pool = counting_pool(keep=2)
    lent = [pool.take() for _ in range(4)]
    assert [item[0] for item in lent] == [0, 1, 2, 3]
    for item in lent:
        pool.give(item)
    # Only the two it owns come back, the last given first.
    assert [pool.take()[0] for _ in range(3)] == [1, 0, 4]


def test_a_discarded_object_is_not_lent_again_and_a_new_one_replaces_it():
    pool = counting_pool(keep=1)
    first = pool.take()
    pool.discard(first)
    pool.give(first)  # no longer the pool's: dropped
    second = pool.take()
    assert second[0] == 1
    pool.give(second)
    assert pool.take() is second


def test_threads_borrowing_at_once_never_share_an_object():
    pool = counting_pool(keep=4)
    holders = {}
    shared = []
    lock = threading.Lock()

    def borrow(name):
        for _ in range(2000):
            item = pool.take()
            with lock:
                if id(item) in holders:
                    shared.append(item)
                holders[id(item)] = name
            with lock:
                del holders[id(item)]
            pool.give(item)

    threads = [threading.Thread(target=borrow, args=(number,),
                                name="test-pool-%d" % number)
               for number in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert shared == []
    assert len(pool._own) <= 4


def test_a_receive_buffer_is_a_writable_map_of_its_size():
    pool = BufferPool(8192, keep=1)
    buffer = pool.take()
    assert len(buffer) == 8192 and not buffer.readonly
    buffer[:5] = b"hello"
    pool.give(buffer)
    assert bytes(pool.take()[:5]) == b"hello"
