"""utils' file helpers that resuming relies on: whole JSON told from a torn file, and orphaned temporary files."""

import utils


def test_holds_json_tells_a_whole_file_from_a_torn_or_missing_one(tmp_path):
    whole, torn = tmp_path / "summary.json", tmp_path / "torn.json"
    utils.write_json(whole, {"models": [1, 2, 3]})
    torn.write_text(whole.read_text()[: len(whole.read_text()) // 2])
    assert utils.holds_json(whole) and not utils.holds_json(torn) and not utils.holds_json(tmp_path / "none.json")


def test_remove_orphans_takes_only_what_atomic_writes_left(tmp_path):
    kept = [tmp_path / "teacher" / "train_state.pth", tmp_path / "notes.tmp", tmp_path / ".hidden"]
    orphan = tmp_path / "teacher" / ".train_state.pth.x1y2.tmp"
    for path in [*kept, orphan]:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("x")
    assert utils.remove_orphans(tmp_path) == [orphan]
    assert not orphan.exists() and all(path.exists() for path in kept)
