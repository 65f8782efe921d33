"""The start-up check that --save / --load lie on a filesystem every rank sees, with 2 real gloo ranks.

Two ranks on one machine share every path; a node-local directory is modelled by giving rank 1 a
directory of its own under the same argument: it cannot see the file rank 0 writes in its one."""

from __future__ import annotations

from tests.distributed.harness import run_fn


def check(groups, root: str, per_rank: bool, create: bool) -> str:
    import os

    from samoe_dist.checkpoint import check_shared_filesystem
    from samoe_dist.config import ConfigError

    path = os.path.join(root, f"rank{groups.rank}" if per_rank else "shared")
    try:
        check_shared_filesystem(path, "--save", create=create)
    except ConfigError as exc:
        return str(exc)
    return "ok" + ("" if not os.path.isdir(path) else ":" + ",".join(sorted(os.listdir(path))))


def test_every_rank_sees_the_save_directory(tmp_path):
    assert run_fn(2, 1, check, (str(tmp_path), False, True), tmp_path / "a") == ["ok:", "ok:"]  # probe removed


def test_a_node_local_directory_fails_on_every_rank_naming_the_blind_one(tmp_path):
    for rank1 in (tmp_path / "b" / "rank1",):
        rank1.mkdir(parents=True)
    out = run_fn(2, 1, check, (str(tmp_path / "b"), True, True), tmp_path / "out")
    for rank, message in enumerate(out):  # every rank fails, each naming its own path and the blind rank
        assert f"--save {tmp_path / 'b' / f'rank{rank}'} is not on a filesystem every node shares: rank 1 on" \
            in message, message
        assert "rank 0 on" not in message


def test_a_missing_load_directory_is_left_to_the_load_error(tmp_path):
    assert run_fn(2, 1, check, (str(tmp_path / "nowhere"), False, False), tmp_path / "c") == ["ok", "ok"]
