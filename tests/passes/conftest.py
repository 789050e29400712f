import pytest

import rewriter.cost as cost


@pytest.fixture
def data_dir(tmp_path, monkeypatch):
    """A temporary directory in place of rewriter/data for the measured linear tables."""
    monkeypatch.setattr(cost, "_DATA", tmp_path)
    return tmp_path

