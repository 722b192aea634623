"""The accounting rule every stage obeys."""

import pytest

from pipeline.manifest import AccountingError, Manifest, count_reasons, merge_reasons


def test_balanced_manifest_passes_and_round_trips(tmp_path):
    manifest = Manifest(stage="s", **{"in": 10}, kept=6, dropped={"too_small": 1}, failed={"http_404": 3})
    manifest.check_balance()
    manifest.write(tmp_path)
    assert Manifest.read(tmp_path) == manifest
    assert '"in": 10' in (tmp_path / "manifest.json").read_text()


@pytest.mark.parametrize(("kept", "message"), [(5, r"\(1 samples lost\)"), (8, r"\(2 samples counted twice\)")])
def test_unbalanced_manifest_names_the_gap(kept, message):
    manifest = Manifest(stage="s", **{"in": 10}, kept=kept, failed={"timeout": 4})
    with pytest.raises(AccountingError, match=message):
        manifest.check_balance()


def test_reason_tallies():
    assert count_reasons(["b", "a", "b"]) == {"a": 1, "b": 2}
    assert merge_reasons({"a": 1}, {"a": 2, "c": 1}) == {"a": 3, "c": 1}


def test_missing_manifest_reads_as_unfinished(tmp_path):
    assert Manifest.read(tmp_path) is None
