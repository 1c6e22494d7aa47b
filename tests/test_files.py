"""files.py's two output rules, where they live: a binary output written by name is renamed
into place only when complete (staged_path), and when an existing output may be replaced
(check_replaceable: score's file, data prepare's directory, convert's and demo's)."""

import pytest

from limajax.errors import UserError
from limajax.files import check_replaceable, mark_output, staged_path


def test_a_path_written_by_name_appears_only_when_complete(tmp_path):
    out = tmp_path / "chart.png"
    out.write_bytes(b"old")
    with pytest.raises(RuntimeError), staged_path(out) as tmp:
        tmp.write_bytes(b"half")
        raise RuntimeError("the writer failed")
    assert out.read_bytes() == b"old" and sorted(tmp_path.iterdir()) == [out]
    with staged_path(out) as tmp:
        tmp.write_bytes(b"new")
        assert out.read_bytes() == b"old"  # readers see the old file until the end
    assert out.read_bytes() == b"new" and sorted(tmp_path.iterdir()) == [out]


def refused(final, **kw) -> str:
    with pytest.raises(UserError) as e:
        check_replaceable(final, **kw)
    return str(e.value)


def test_which_outputs_may_be_replaced(tmp_path):
    (tmp_path / "empty").mkdir()
    for free in (tmp_path / "new", tmp_path / "empty"):  # nothing there to lose
        for overwrite in (None, False):
            check_replaceable(free, overwrite=overwrite, command="convert")
    file = tmp_path / "scores.jsonl"
    file.write_text("{}\n")
    assert "already exists (pass --overwrite" in refused(file, overwrite=False)
    check_replaceable(file, overwrite=True)  # a file output replaces a file
    assert "is a directory" in refused(tmp_path / "empty", overwrite=True)
    assert "choose a new --output" in refused(file, overwrite=None)  # no --overwrite option
    made = tmp_path / "model"
    made.mkdir()
    mark_output(made, "convert")
    check_replaceable(made, overwrite=True, command="convert")
    assert "not an earlier output of `limajax demo`" in refused(made, overwrite=True,
                                                                 command="demo")
    assert "not an earlier output" in refused(file, overwrite=True, command="convert")
