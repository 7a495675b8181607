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
    # a not-recorded study's missing count makes the column float: counts still print as integers
    mixed = answer.verdict_text(_table(n=float("nan"), status="not recorded", runs=0).astype({"n": float}))
    assert "(n=5)" in mixed and "(n=5.0)" not in mixed and "(n=-)" in mixed


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


def test_findings_say_each_verdict_in_words_with_the_interval():
    t = _table(claim="all-layers-hurt", verdict="disagrees", verdict_project="inconclusive", margin=0.2,
               estimate=-0.0004, low=-0.1, high=0.15, contrast="all vs last-2")
    said = answer.Answer(t).findings().sentences
    assert said[0] == ("scratch protocol: the claim that MoE late helps is not decided: last-2 minus dense is +0.250 "
                       "accuracy points (95% interval -0.500 to +1.000, n = 5).")
    assert "is void: an arm it reads failed a pre-registered check" in said[1]
    assert said[2].startswith("upcycle: the claim that MoE late helps is not decided yet (3 of 10 runs recorded); "
                              "so far last-2 minus dense is +0.250")
    # a 'disagrees' inside its margin says so; a differing project-wide verdict is named; no '-0.000'
    assert "does not hold: all minus last-2 is +0.000 accuracy points (95% interval -0.100 to +0.150" in said[3]
    assert "within the 0.2-point margin" in said[3] and "project-wide Holm) it reads inconclusive" in said[3]
    only = answer.Answer(t).findings(columns=["upcycle"])
    assert len(only.sentences) == 1 and only._repr_markdown_().startswith("- Upcycle: the claim")
    excess = answer.finding_sentence({**t.iloc[0].to_dict(), "contrast": "all: NMI over random routers",
                                      "unit": "NMI"})
    assert "in all, NMI over random routers is +0.250 NMI" in excess


def test_claim_lines_show_html_in_a_notebook_and_the_same_lines_as_text():
    from workbench.studies import report
    from workbench.studies.claims import format_claims

    t = report.claims("placement", "scratch")
    shown = report.ClaimLines(t)
    assert repr(shown) == format_claims(t)  # what nbval compares
    page = shown._repr_html_()
    assert page.count("<tr>") == 1 + len(t) and "white-space:nowrap" in page
    for r in t.itertuples():
        assert r.id in page and f"{r.estimate:+.3f} [{r.low:+.3f}, {r.high:+.3f}]" in page and r.verdict in page
