"""The answer table that opens each notebook: every claim shown with its interval and both verdicts, as HTML that
does not wrap a number; a void or incomplete study says so."""
import pandas as pd

from workbench.studies import answer


def _table(**over):
    row = {"column": "scratch protocol", "study": "s", "claim": "late-moe-helps", "says": "MoE late helps",
           "contrast": "last-2 vs dense", "kind": "paired", "unit": "accuracy points", "n": 5, "estimate": 0.25,
           "low": -0.5, "high": 1.0, "expect": "greater", "margin": 0.0, "verdict": "inconclusive",
           "verdict_project": "inconclusive", "runs": 10, "planned": 10, "status": "complete"}
    rows = [row, {**row, "claim": "early-moe-hurts", "verdict": "void", "verdict_project": "void"},
            {**row, "column": "upcycle", "study": "u", "verdict": "agrees", "runs": 3, "status": "incomplete"},
            {**row, **over}]
    return pd.DataFrame(rows)


def test_html_shows_each_claim_void_and_incomplete():
    t = _table(claim="all-layers-hurt", column="upcycle", study="u", runs=3, status="incomplete",
               verdict="disagrees")
    page = answer.verdict_html(t, caption="c")
    for claim in t["claim"]:
        assert claim in page
    assert "void" in page and "incomplete, 3 of 10 runs" in page and "no verdict until every run is in" in page
    assert "+0.250 [-0.500, +1.000]" in page and "white-space:nowrap" in page
    assert page.count("<tr>") == 1 + 3  # header and one row per claim
    text = repr(answer.Answer(t, caption="c"))
    assert "early-moe-hurts" in text and "-> void" in text and "incomplete: 3 of 10 runs" in text


def test_verdict_table_reads_recorded_studies_with_their_project_verdict():
    t = answer.verdict_table(answer.columns("placement"), ids=["late-moe-helps"])
    assert set(t["claim"]) == {"late-moe-helps"} and t["column"].is_unique
    assert set(t["verdict"]) <= {"agrees", "disagrees", "inconclusive", "void"}
    assert set(t["verdict_project"]) <= {"agrees", "disagrees", "inconclusive", "void"}
    assert "late-moe-helps" in answer.Answer(t)._repr_html_()


def test_a_claim_twice_in_one_column_is_refused():
    import pytest

    with pytest.raises(ValueError, match="twice"):
        answer.verdict_table([("one", ["confirm/scratch", "confirm_shared/scratch"])])


def test_small_tables_render():
    assert "mean rank" in answer.pruning_ranks()._repr_html_()
    assert "vimoe_tiny_fmnist" in answer.checkpoints()._repr_html_()
