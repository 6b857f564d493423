"""A study storage's secrets stay hidden in every form a driver reads them: percent-encoded keys, any case,
`sslpassword`, and the values as written or decoded; also through a real sweep on an SQLite storage."""

from __future__ import annotations

import optuna
import pytest
from test_sweep import SWEEP_FLAGS

import experiment
from config import settings
from core import secrets
from core.errors import SettingsError
from sweep import search

SECRET = "s3cret-Value"


@pytest.mark.parametrize(("url", "shown"), [
    (f"sqlite:///s.db?pass%77ord={SECRET}", "sqlite:///s.db?pass%77ord=***"),
    (f"postgresql://kd@db/kd?sslpassword={SECRET}&sslmode=require",
     "postgresql://kd@db/kd?sslpassword=***&sslmode=require"),
    (f"mysql://kd@db/kd?PassWord={SECRET}&PWD={SECRET}", "mysql://kd@db/kd?PassWord=***&PWD=***"),
    (f"postgresql://kd:{SECRET}@db/kd?%70assword={SECRET}", "postgresql://kd:***@db/kd?%70assword=***"),
    ("postgresql://kd@db/kd?sslmode=require", "postgresql://kd@db/kd?sslmode=require"),
])
def test_every_password_like_key_is_hidden_however_it_is_spelled(url, shown):
    assert settings.without_password(url) == shown


def test_an_error_quoting_the_url_shows_no_form_of_the_secret(monkeypatch):
    """A driver's message may quote the URL, or the secret as written or decoded: each is hidden."""
    url = f"postgresql://kd:{SECRET}%21@db/kd?sslpassword={SECRET}%2B1"

    def refuse(given, **kwargs):
        raise ValueError(f"cannot use {given}: password {SECRET}! or {SECRET}+1 refused")

    monkeypatch.setattr(optuna.storages, "RDBStorage", refuse)
    with pytest.raises(SettingsError) as refused:
        search.connect(url)
    assert SECRET not in str(refused.value) and "***" in str(refused.value), refused.value


def test_a_percent_encoded_password_key_reaches_no_written_file(tiny_data, tmp_path, capsys):
    """A real sweep on an SQLite storage (which ignores the query items): the secret is in no file and not on the
    console."""
    url = f"sqlite:///{tmp_path / 'study.db'}?pass%77ord={SECRET}&SSLPassword={SECRET}2"
    run_dir = tmp_path / "runs" / "secret"
    code = experiment.main(["--data-dir", str(tiny_data), "--output-dir", str(run_dir), *SWEEP_FLAGS,
                            "--trials", "1", "--study-storage", url, "--study-name", "secret"])
    console = capsys.readouterr()
    assert code == 0, console.err
    assert SECRET not in console.out + console.err
    written = [path for path in tmp_path.rglob("*") if path.is_file() and path.name != "study.db"]
    assert len(written) > 10 and (run_dir / "student_kd" / "best_model.pth") in written
    for path in written:
        assert SECRET.encode() not in path.read_bytes(), path
    assert secrets.masked_url(url) in (run_dir / "config.json").read_text()
