"""``kascade report``: roofline placement, model error, search history, and the three files it writes."""

from __future__ import annotations

import base64
import json
import re
import shutil
import subprocess
from html.parser import HTMLParser

import optuna
import pytest
import sqlalchemy as sa

from kascade.autotune.db import TuningDatabase, TuningKey, TuningRecord
from kascade.autotune.report import (
    SCHEMA_VERSION,
    ReportError,
    attention_prefill_work,
    causal_pairs,
    library_schedules,
    mape,
    record_work,
    spearman,
)
from kascade.ir.errors import KascadeError
from kascade.report import report_command

VERSIONS = "kascade=0.1.0 triton=3.6.0 torch=2.11 cuda=13.0"
CFG = "BLOCK_M=128,BLOCK_N=64,num_stages=3,num_warps=8"
MEASURED = [2.0e-4, 7.0e-4, 2.5e-3, 1.0e-2]      # dense attention on h200, P = M = 1024 ... 8192
PREDICTED = [1.5e-4, 6.0e-4, 3.0e-3, 0.9e-2]     # the cost model's, same keys: ranks 1, 2, 3, 4 -> 1, 2, 3, 4


def bucket(P: int, heads: int = 64, E: int = 128) -> str:
    return f"E={E},F={E},M={P},P={P},heads={heads}"


def schedule_of(name: str) -> str:
    return next(key for key, (n, _) in library_schedules().items() if n == name)


def put(db: TuningDatabase, schedule: str, bkt: str, seconds: float, measured: bool = True,
        target: str = "h200 (sm_90a)", config: str = CFG) -> None:
    db.put(TuningRecord(TuningKey(schedule, bkt, "bf16", target, VERSIONS, measured), config, seconds,
                        {"0.2": seconds * 0.98, "0.5": seconds, "0.8": seconds * 1.02} if measured else {},
                        "test-study"))


def make_study(url: str, name: str, values: list[float | None]) -> None:
    """A study with one trial per value (None: a failed trial), as the tuner would leave it."""
    study = optuna.create_study(study_name=name, storage=url, direction="minimize")
    study.set_user_attr("unit", "s")
    for v in values:
        trial = study.ask()
        trial.suggest_categorical("BLOCK_M", [32, 64, 128])
        if v is None:
            study.tell(trial, state=optuna.trial.TrialState.FAIL)
        else:
            study.tell(trial, v)


@pytest.fixture(scope="module")
def storage(tmp_path_factory) -> str:
    url = f"sqlite:///{tmp_path_factory.mktemp('db') / 'tuning.db'}"
    db = TuningDatabase(url)
    dense, causal = schedule_of("attention"), schedule_of("attention_causal")
    for P, m, p in zip((1024, 2048, 4096, 8192), MEASURED, PREDICTED):
        put(db, dense, bucket(P), m)
        put(db, dense, bucket(P), p, measured=False, config="BLOCK_M=128,BLOCK_N=128,num_stages=3,num_warps=8")
    put(db, causal, bucket(4096), 1.6e-3)
    # 275 GFLOP in 0.1 ms on an A100 is 2.7 PFLOP/s, far above its 312 TFLOP/s roof
    put(db, dense, bucket(4096, heads=32), 1e-4, target="a100-80gb (sm_80)")
    put(db, "paged_decode:0123abcd", "E=128,M0=16,heads=8", 3e-5)            # no FLOP count for it
    make_study(url, "prefill-h200", [4e-3, 5e-3, None, 3e-3, 3.5e-3, 2.5e-3])
    return url


@pytest.fixture(scope="module")
def report(storage, tmp_path_factory):
    paths = report_command(storage, tmp_path_factory.mktemp("out") / "report", None)
    return paths, json.loads(paths.json.read_text()), paths.markdown.read_text(), paths.html.read_text()


# ---- counting --------------------------------------------------------------------------
def test_attention_work_is_flash_attentions_convention_and_one_pass_over_qkvo():
    """Dense: 4 * heads * P * M * E FLOPs (E = F); causal keeps P(P+1)/2 of P^2 pairs; bytes: Q, K, V, O once."""
    b = dict(E=128, F=128, P=4096, M=4096, heads=64)
    dense = attention_prefill_work(b, 2, "dense")
    assert dense.flops == 4 * 64 * 4096 * 4096 * 128
    assert dense.bytes == 4 * 64 * 4096 * 128 * 2
    assert dense.intensity == pytest.approx(4096 / 2)
    causal = attention_prefill_work(b, 2, "causal")
    assert causal.flops == 4 * 64 * (4096 * 4097 // 2) * 128
    assert causal_pairs(3, 5) == 3 + 4 + 5 and causal_pairs(5, 3) == 1 + 2 + 3   # bottom-right aligned


def test_record_work_counts_library_schedules_and_names_what_it_cannot_count():
    work, _ = record_work(schedule_of("attention_causal"), bucket(1024), "bf16")
    assert work.flops == 2 * 64 * causal_pairs(1024, 1024) * 256
    unknown_cascade, why = record_work("attention_prefill:feedface", bucket(1024), "bf16")
    assert unknown_cascade.flops == 4 * 64 * 1024 * 1024 * 128 and "dense assumed" in why
    for schedule, bkt, dtype, reason in [("paged_decode:abc", bucket(1024), "bf16", "family"),
                                         (schedule_of("attention"), "P=1024", "bf16", "lacks"),
                                         (schedule_of("attention"), "garbage", "bf16", "lacks"),
                                         (schedule_of("attention"), bucket(1024), "int4", "dtype"),
                                         (schedule_of("attention_window"), bucket(1024), "bf16", "mask")]:
        work, why = record_work(schedule, bkt, dtype)
        assert work is None and reason in why


def test_spearman_and_mape_on_a_hand_made_case():
    """Ranks (1, 2, 3, 4) vs (1, 2, 4, 3): rho = 1 - 6 * 2 / (4 * 15) = 0.8; ties take average ranks."""
    assert spearman([1, 2, 3, 4], [1.1, 1.8, 3.6, 3.5]) == pytest.approx(0.8)
    assert mape([1, 2, 3, 4], [1.1, 1.8, 3.6, 3.5]) == pytest.approx((0.1 + 0.1 + 0.2 + 0.125) / 4 * 100)
    assert spearman([1, 2, 2, 3], [1, 2, 3, 4]) == pytest.approx(4.5 / (4.5 * 5) ** 0.5)
    assert spearman([4, 3, 2, 1], [1, 2, 3, 4]) == pytest.approx(-1.0)
    assert spearman([1], [2]) is None and spearman([1, 1], [1, 2]) is None and mape([], []) is None


# ---- the report ------------------------------------------------------------------------
def test_json_has_a_schema_version_and_every_part(report):
    paths, doc, _, _ = report
    assert doc["schema_version"] == SCHEMA_VERSION and doc["kind"] == "kascade_report"
    assert {"generated", "storage", "target_filter", "summary", "targets", "records", "model_error", "studies",
            "warnings", "notes"} <= doc.keys()
    assert doc["summary"] == {"records": 11, "measured": 7, "predicted": 4, "on_roofline": 10, "above_roof": 1,
                              "studies": 1, "warnings": 1}
    h200 = next(t for t in doc["targets"] if t["name"] == "h200")
    assert h200["memory_roof"]["measured"] and h200["ridge_intensity"] == pytest.approx(790e12 / 4.3e12)
    decode = next(r for r in doc["records"] if r["schedule"].startswith("paged_decode"))
    assert decode["work"] is None and decode["roofline"] is None and "paged_decode" in decode["work_note"]
    placed = next(r for r in doc["records"] if r["bucket"] == bucket(1024) and r["measured"])
    assert placed["roofline"]["achieved_flops_per_s"] == pytest.approx(4 * 64 * 1024 ** 2 * 128 / MEASURED[0])
    assert 0 < placed["roofline"]["fraction_of_bound"] < 1 and placed["roofline"]["bound"] == "tensor bf16"
    (study,) = doc["studies"]
    assert (study["trials"], study["complete"], study["failed"]) == (6, 5, 1)
    assert [h["best"] for h in study["history"]] == [4e-3, 4e-3, 3e-3, 3e-3, 2.5e-3]
    assert [p.name for p in paths.figures] == ["roofline-a100-80gb.png", "roofline-h200.png", "model-error.png",
                                               "history-prefill-h200.png"]


def test_model_error_pairs_measured_and_predicted_records_of_one_key(report):
    _, doc, md, _ = report
    err = doc["model_error"]
    assert err["pairs"] == 4 and err["spearman"] == pytest.approx(spearman(MEASURED, PREDICTED))
    assert err["mape_percent"] == pytest.approx(mape(MEASURED, PREDICTED))
    assert err["by_target"]["h200 (sm_90a)"]["pairs"] == 4
    assert f"Spearman rank correlation {spearman(MEASURED, PREDICTED):.3f}" in md


def test_markdown_has_the_tables_and_links_the_figures(report):
    paths, _, md, _ = report
    tables = {line for line in md.splitlines() if line.startswith("| ")}
    assert "| # | kernel | bucket | dtype | kind | time | achieved | FLOP/byte | bound | of bound | flag |" in tables
    assert any(line.startswith("| target | kernel | bucket | dtype | kind | config | time (p50) |") for line in tables)
    assert f"Every record was tuned with {VERSIONS}." in md
    configs = md.split("## Tuned configs")[1].split("## ")[0]
    assert configs.count("\n| h200 (sm_90a) |") == 10 and CFG in configs and "paged_decode:0123abcd" in configs
    for link in re.findall(r"!\[[^\]]*\]\((figures/[^)]+)\)", md):
        assert (paths.out_dir / link).is_file()
    assert "## Search history" in md and "| prefill-h200 | minimize | 6 | 5 | 1 | 2.5 ms |" in md


def test_html_embeds_every_chart_and_references_nothing_outside(report):
    paths, _, _, page = report
    images = re.findall(r'<img src="([^"]+)"', page)
    assert len(images) == len(paths.figures)
    for src in images:
        assert src.startswith("data:image/png;base64,")
        assert base64.b64decode(src.split(",", 1)[1])[:8] == b"\x89PNG\r\n\x1a\n"
    assert all(h.startswith("#") for h in re.findall(r'href="([^"]*)"', page))
    assert all(s.startswith("data:") for s in re.findall(r'src="([^"]*)"', page))
    for outside in ("<script", "<link", "@import", "url(", "<iframe"):
        assert outside not in page
    assert_well_formed(page)


def test_a_point_above_the_roof_is_flagged(report):
    _, doc, md, page = report
    above = [r for r in doc["records"] if r["roofline"] and r["roofline"]["above_roof"]]
    assert [r["target"] for r in above] == ["a100-80gb (sm_80)"]
    assert above[0]["roofline"]["fraction_of_bound"] > 1
    (warning,) = doc["warnings"]
    assert "a100-80gb" in warning and "counting bug" in warning
    assert "**WARNING:**" in md and "ABOVE ROOF" in md
    assert page.count('class="flagged"') == 2       # its roofline row and its config row


def test_a_target_filter_keeps_that_targets_records_and_roofline(storage, tmp_path):
    paths = report_command(storage, tmp_path, "h200")
    doc = json.loads(paths.json.read_text())
    assert doc["target_filter"] == "h200" and [t["name"] for t in doc["targets"]] == ["h200"]
    assert {r["target"] for r in doc["records"]} == {"h200 (sm_90a)"} and doc["warnings"] == []


@pytest.mark.parametrize("kind", ["default storage never created", "database without records"])
def test_an_empty_database_gives_a_valid_report_that_says_so(kind, tmp_path, monkeypatch):
    monkeypatch.setenv("KASCADE_CACHE_DIR", str(tmp_path / "cache"))
    storage = None
    if kind == "database without records":
        storage = f"sqlite:///{tmp_path / 'empty.db'}"
        assert list(TuningDatabase(storage).records()) == []
    paths = report_command(storage, tmp_path / "out", None)
    doc = json.loads(paths.json.read_text())
    assert doc["schema_version"] == SCHEMA_VERSION and doc["records"] == [] and doc["studies"] == []
    assert doc["model_error"]["spearman"] is None and paths.figures == ()
    assert "no tuned records yet" in paths.markdown.read_text()
    page = paths.html.read_text()
    assert "no tuned records yet" in page and "<img" not in page
    assert_well_formed(page)
    assert not (tmp_path / "cache").exists()   # reporting creates no database


def test_reporting_writes_nothing_into_the_storage(tmp_path):
    url = f"sqlite:///{tmp_path / 'only-records.db'}"
    put(TuningDatabase(url), schedule_of("attention"), bucket(1024), 2e-4)
    engine = sa.create_engine(url)
    before = set(sa.inspect(engine).get_table_names())
    report_command(url, tmp_path / "out", None)
    assert set(sa.inspect(engine).get_table_names()) == before    # no Optuna tables appear
    engine.dispose()


def test_unusable_storage_or_folder_is_a_clear_error(tmp_path, storage):
    (tmp_path / "junk.db").write_bytes(b"this is not a database" * 100)
    (tmp_path / "a-file").write_text("")
    cases = [("mysql://u@h/db", tmp_path / "o", None, "accepted: sqlite:///"),
             (f"sqlite:///{tmp_path / 'missing.db'}", tmp_path / "o", None, "no tuning database at"),
             (f"sqlite:///{tmp_path / 'junk.db'}", tmp_path / "o", None, "cannot read storage"),
             (storage, tmp_path / "a-file", None, "is a file")]
    for url, out, target, message in cases:
        with pytest.raises(ReportError, match=re.escape(message)):
            report_command(url, out, target)
    with pytest.raises(KascadeError, match="unknown target"):
        report_command(storage, tmp_path / "o", "h900")


# ---- in a real browser ---------------------------------------------------------------------
def chromium() -> str | None:
    return next((p for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
                 if (p := shutil.which(name))), None)


def test_the_page_renders_in_headless_chromium(report, tmp_path):
    browser = chromium()
    if browser is None:
        pytest.skip("no chromium binary: `apt-get install chromium` (CI installs it)")
    paths, _, _, _ = report
    flags = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
             f"--user-data-dir={tmp_path / 'profile'}"]
    url = paths.html.resolve().as_uri()
    dom = subprocess.run([*flags, "--dump-dom", url], capture_output=True, text=True, timeout=120).stdout
    assert dom.count("<table") >= 5 and dom.count('src="data:image/png;base64,') == len(paths.figures)
    assert "Roofline: h200" in dom and "Cost model against measurements" in dom and "ABOVE ROOF" in dom
    shot = tmp_path / "shot.png"
    subprocess.run([*flags, f"--screenshot={shot}", "--window-size=1280,2000", url], capture_output=True,
                   timeout=120, check=True)
    import matplotlib.image
    import numpy as np
    pixels = matplotlib.image.imread(shot)
    assert pixels.shape[:2] == (2000, 1280)
    colours = np.unique((pixels[..., :3] * 255).astype(np.uint8).reshape(-1, 3), axis=0)
    assert len(colours) > 200, f"the screenshot looks blank ({len(colours)} distinct colours)"
    assert (pixels[..., :3].std(axis=(0, 1)) > 0.05).all()


# ---- helpers ------------------------------------------------------------------------------
_VOID = {"meta", "img", "br", "hr", "input", "link", "wbr"}


def assert_well_formed(page: str) -> None:
    """Every opened element is closed in order (the page is valid enough for any parser)."""
    stack: list[str] = []

    class Checker(HTMLParser):
        def handle_starttag(self, tag, attrs):
            if tag not in _VOID:
                stack.append(tag)

        def handle_endtag(self, tag):
            assert stack and stack[-1] == tag, f"</{tag}> closes <{stack[-1] if stack else None}>"
            stack.pop()

    Checker().feed(page)
    assert stack == [] and page.lstrip().startswith("<!DOCTYPE html>")


def test_the_report_command_line(run_kascade, tmp_path):
    """`kascade report` writes the three files; a bad storage URL is a clear error."""
    r = run_kascade("report", "--out", str(tmp_path / "r"), "--storage", f"sqlite:///{tmp_path / 'none.db'}")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    r = run_kascade("report", "--out", str(tmp_path / "r"))
    assert r.returncode == 0, r.stderr
    assert all((tmp_path / "r" / f).is_file() for f in ("report.md", "report.html", "report.json"))


def test_decode_and_moe_records_are_counted_for_the_roofline():
    from kascade.autotune.report import record_work
    work, basis = record_work("paged_decode_partial+paged_decode_merge:ab", "E=128,F=128,L=4096,M0=16,R=4,seqs=64",
                              "bf16")
    assert basis == "paged decode, KV read once" and work.bytes == 64 * 4096 * 256 * 2
    assert work.flops == 2.0 * 64 * 4 * 4096 * 256
    work, _ = record_work("moe_gate_up+moe_down+moe_combine:cd", "D=4096,E=8,F=14336,K=2,T=1", "bf16")
    assert work.flops == 2.0 * 2 * 3 * 4096 * 14336
    assert work.bytes == pytest.approx((2 * 3 * 4096 * 14336 + 2 * 4096) * 2)   # one token touches exactly 2
    assert record_work("moe_gate_up+moe_down+moe_combine:cd", "D=4096,E=8", "bf16")[0] is None
