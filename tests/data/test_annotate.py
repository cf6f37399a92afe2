"""Expert review: stratified CSV sample, CSV import, interactive review (library and CLI)."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
from click.testing import CliRunner

from cl_release.data.annotate import CSV_COLUMNS, export_sample, import_csv, pick_sample, review
from cl_release.cli import main
from cl_release.errors import DataError, UserError
from cl_release.store.sqlite import FeedbackStore

PROJECT_YAML = "name: t\nbase_model: {name: models/tiny}\ndatasets: [{name: d, path: d.jsonl}]\n"
TRICKY = 'has, commas; "quotes" and\na newline\r\nand CRLF'


@pytest.fixture
def store(tmp_path) -> FeedbackStore:
    s = FeedbackStore(tmp_path / "feedback.db")
    yield s
    s.close()


def fill(store: FeedbackStore) -> None:
    """100 answers: 20 rated negative, 60 with a quality score, 20 plain; 5 already expert-rated."""
    for i in range(100):
        store.log([{"role": "user", "content": f"q{i}, \"quoted\"\nline two"}], f"answer {i}, {TRICKY}",
                  request_id=f"r{i:03d}", quality_score=(i / 100 if 20 <= i < 80 else None),
                  created_at=f"2026-01-01T00:{i // 60:02d}:{i % 60:02d}")
        if i < 20:
            store.feedback(f"r{i:03d}", rating=1 if i % 2 else None, thumbs=-1 if i % 2 == 0 else None)
    for i in range(95, 100):
        store.feedback(f"r{i:03d}", rating=5, annotator="expert")


def test_sample_is_stratified_and_deterministic(store):
    fill(store)
    picked = pick_sample(store, n=50, seed=7)
    strata = [s for s, _ in picked]
    assert (strata.count("error"), strata.count("low_confidence"), strata.count("random")) == (15, 15, 20)
    ids = [r["id"] for _, r in picked]
    assert len(set(ids)) == 50
    assert all(int(r["id"][1:]) < 20 for s, r in picked if s == "error")
    assert sorted(r["id"] for s, r in picked if s == "low_confidence") == [f"r{i:03d}" for i in range(20, 35)]
    assert not {f"r{i:03d}" for i in range(95, 100)} & set(ids)  # expert-rated ones are not asked again
    assert pick_sample(store, n=50, seed=7) == picked
    assert [r["id"] for _, r in pick_sample(store, n=50, seed=8)] != ids


def test_small_store_fills_with_random(store):
    store.log("q", "a", request_id="only")
    assert [(s, r["id"]) for s, r in pick_sample(store, n=50)] == [("random", "only")]
    with pytest.raises(UserError):
        pick_sample(store, n=0)


def test_csv_round_trip_with_commas_quotes_and_newlines(store, tmp_path):
    fill(store)
    out = tmp_path / "sample.csv"
    counts = export_sample(store, out, n=10, seed=1)
    assert counts == {"error": 3, "low_confidence": 3, "random": 4}
    with open(out, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    assert tuple(rows[0]) == CSV_COLUMNS and len(rows) == 10
    first = store.get(rows[0]["id"])
    assert rows[0]["output"] == first["output"] and TRICKY in rows[0]["output"]
    assert rows[0]["input"] == f"user: {first['input'][0]['content']}"
    # the expert fills in ratings and tricky corrections, then saves
    for i, row in enumerate(rows):
        row["rating"] = str(1 + i % 5)
        row["correction"] = TRICKY + f" #{i}" if i % 2 else ""
        row["annotator"] = "dr. a, \"sr\"" if i < 5 else ""
    rows[9]["rating"] = rows[9]["correction"] = ""  # left blank: skipped
    with open(out, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=CSV_COLUMNS)
        w.writeheader()
        w.writerows(rows)
    assert import_csv(store, out) == 9
    for i, row in enumerate(rows[:9]):
        got = store.get(row["id"])
        assert got["rating"] == 1 + i % 5
        assert got["correction"] == (TRICKY + f" #{i}" if i % 2 else None)
        assert got["annotator"] == ("dr. a, \"sr\"" if i < 5 else "expert")
    assert store.get(rows[9]["id"])["annotator"] is None


def write_csv(path: Path, rows: list[dict], columns=CSV_COLUMNS) -> Path:
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=columns)
        w.writeheader()
        w.writerows(rows)
    return path


@pytest.mark.parametrize(
    "bad, message, field",
    [
        ({"id": "r001", "rating": "7"}, "rating", "rating"),
        ({"id": "r001", "rating": "good"}, "whole number", "rating"),
        ({"id": "", "rating": "3"}, "missing id", "id"),
        ({"id": "nope", "rating": "3"}, "no logged answer", "id"),
    ],
)
def test_bad_csv_row_names_its_line_and_writes_nothing(store, tmp_path, bad, message, field):
    fill(store)
    rows = [{"id": "r000", "rating": "4", "notes": "multi\nline\nnote"}, {"id": "r002", "rating": "5"}, bad]
    f = write_csv(tmp_path / "x.csv", rows)
    with pytest.raises(DataError, match=message) as e:
        import_csv(store, f)
    assert f"x.csv:6: {field}" in str(e.value)  # header, 3-line row, row, bad row
    assert store.get("r000")["rating"] is None and store.get("r002")["thumbs"] == -1


def test_csv_optional_columns_and_missing_columns(store, tmp_path):
    store.log("q", "a", request_id="r1")
    cols = (*CSV_COLUMNS, "hallucinated", "severity")
    f = write_csv(tmp_path / "x.csv", [{"id": "r1", "rating": "1", "hallucinated": "yes", "severity": "safety"}], cols)
    assert import_csv(store, f) == 1
    got = store.get("r1")
    assert (got["hallucinated"], got["severity"]) == (True, "safety")
    g = write_csv(tmp_path / "y.csv", [{"id": "r1"}], ("id", "stratum"))
    with pytest.raises(DataError, match="y.csv:1: missing column 'rating'"):
        import_csv(store, g)


# ---------------------------------------------------------------- interactive review


class Script:
    """Answers prompts from a list; records what was shown."""

    def __init__(self, answers):
        self.answers = list(answers)
        self.shown: list[str] = []
        self.asked: list[str] = []

    def prompt(self, text: str) -> str:
        self.asked.append(text)
        if not self.answers:
            raise EOFError
        return self.answers.pop(0)


def test_review_saves_each_answer_and_resumes(store):
    for i in range(4):
        store.log(f"question {i}", f"answer {i}", request_id=f"r{i}", model_version="1.0.0",
                  created_at=f"2026-01-0{i + 1}")
    store.feedback("r1", rating=5)  # already has feedback: not shown
    s = Script(["4", "", "x", "2", "the right answer", "q"])
    summary = review(store, prompt=s.prompt, echo=s.shown.append)
    assert (summary.reviewed, summary.skipped, summary.quit) == (2, 0, True)
    assert "question 0" in s.shown[0] and "answer 0" in s.shown[0]
    assert any("Please answer 1-5" in line for line in s.shown)
    assert (store.get("r0")["rating"], store.get("r0")["annotator"], store.get("r0")["correction"]) == (4, "review", None)
    assert (store.get("r2")["rating"], store.get("r2")["correction"]) == (2, "the right answer")
    # a new session starts at the first answer still without feedback
    s2 = Script(["s"])
    summary = review(store, prompt=s2.prompt, echo=s2.shown.append)
    assert (summary.reviewed, summary.skipped) == (1 - 1, 1)
    assert "question 3" in s2.shown[0] and len([x for x in s2.shown if x.startswith("\n[")]) == 1
    assert store.get("r3")["rating"] is None


def test_review_filters_and_pages(store):
    for i in range(45):
        store.log("q", "a", request_id=f"r{i:02d}", model_version="1.1.0" if i % 3 == 0 else "1.0.0",
                  created_at=f"2026-01-01T00:00:{i:02d}")
    s = Script(["5", ""] * 15)
    summary = review(store, model="1.1.0", since="2026-01-01T00:00:03", prompt=s.prompt, echo=s.shown.append, page=4)
    assert summary.reviewed == 14 and not summary.quit
    assert store.get("r00")["rating"] is None and store.get("r03")["rating"] == 5


def test_review_cli_with_prompts(tmp_path):
    (tmp_path / "cl-release.yaml").write_text(PROJECT_YAML)
    (tmp_path / "d.jsonl").write_text("")
    store = FeedbackStore(tmp_path / ".cl-release" / "feedback.db")
    for i in range(3):
        store.log(f"question {i}", f"answer {i}", request_id=f"r{i}", created_at=f"2026-01-0{i + 1}")
    runner = CliRunner()
    r = runner.invoke(main, ["-C", str(tmp_path), "review"], input="3\nbetter answer\ns\nq\n")
    assert r.exit_code == 0, r.output
    assert "question 0" in r.output and "reviewed 1, skipped 1 (stopped)" in r.output
    assert (store.get("r0")["rating"], store.get("r0")["correction"]) == (3, "better answer")
    r = runner.invoke(main, ["-C", str(tmp_path), "review"], input="5\n\n")  # input ends: stop cleanly
    assert r.exit_code == 0, r.output
    assert "question 0" not in r.output and "question 1" in r.output
    assert store.get("r1")["rating"] == 5 and store.get("r2")["rating"] is None


def test_annotate_cli_round_trip(tmp_path):
    (tmp_path / "cl-release.yaml").write_text(PROJECT_YAML)
    (tmp_path / "d.jsonl").write_text("")
    store = FeedbackStore(tmp_path / ".cl-release" / "feedback.db")
    fill(store)
    runner = CliRunner()
    r = runner.invoke(main, ["-C", str(tmp_path), "annotate", "export", "--n", "6", "--out", "s.csv", "--seed", "3"])
    assert r.exit_code == 0, r.output
    assert "6 answers (error 2, low_confidence 2, random 2)" in r.output
    with open(tmp_path / "s.csv", newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    rows[0]["rating"], rows[0]["correction"] = "2", TRICKY
    write_csv(tmp_path / "s.csv", rows)
    r = runner.invoke(main, ["-C", str(tmp_path), "annotate", "import", "s.csv"])
    assert r.exit_code == 0 and "1 feedback rows stored" in r.output
    assert store.get(rows[0]["id"])["correction"] == TRICKY
    r = runner.invoke(main, ["-C", str(tmp_path), "annotate", "export", "--n", "2"])
    assert r.exit_code == 0 and r.stdout.startswith("id,stratum,input,output")
    r = runner.invoke(main, ["-C", str(tmp_path), "annotate", "import", "missing.csv"])
    assert r.exit_code == 2 and "cannot read" in r.output
