"""Every rank of a world checks at start-up that it builds from the same layer partition as the others
(`tandem.parallel.layout.init_process_groups`): two gloo ranks on loopback, given different splits as two
nodes resolving an automatic partition on different machines could be, both fail with PartitionError; given
the same split, both build their stage."""

from support.spawned_ranks import run_ranks


def join_world(rank: int, port: int, partitions: list[list[int]], results) -> None:
    import torch.distributed as dist

    from tandem.errors import PartitionError
    from tandem.parallel.layout import init_process_groups

    try:
        layout = init_process_groups(1, partitions[rank], rank, "gloo", f"tcp://127.0.0.1:{port}", timeout_s=60)
        results.put((rank, ("ok", list(layout.partition))))
    except PartitionError as exc:
        results.put((rank, ("PartitionError", str(exc))))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_world(partitions: list[list[int]]) -> dict[int, tuple[str, object]]:
    return run_ranks(join_world, len(partitions), partitions, timeout=120)


def test_ranks_with_different_partitions_refuse_to_start():
    out = run_world([[5, 3], [6, 2]])
    assert [out[r][0] for r in (0, 1)] == ["PartitionError", "PartitionError"]
    assert "[5, 3]" in out[0][1] and "from [5, 2] to [6, 3]" in out[0][1]


def test_ranks_with_the_same_partition_start():
    out = run_world([[5, 3], [5, 3]])
    assert out == {0: ("ok", [5, 3]), 1: ("ok", [5, 3])}
