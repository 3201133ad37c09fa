"""Figure files of a report: each named after its figure, with the run or option that tells it apart,
and while collecting, each the very bytes the report embeds."""

from __future__ import annotations

import base64

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from moelens.report.embed import collecting_files, embed, file_stem, smallest_font_pt  # noqa: E402


def test_file_stems_name_the_figure_and_the_run_or_option():
    assert file_stem("expert_distance", "fig-expert-distance-expert") == "expert_distance"
    assert file_stem("expert_distance", "fig-expert-distance-gate") == "expert_distance--gate"
    assert file_stem("trace_heatmap", "trace-run-2-heatmap", "trace-tuned") == "trace_heatmap--trace-tuned"
    assert file_stem("module_heatmap", "modules-run-1-pair-corr-heat", "modules") == "module_heatmap--modules-pair-corr"
    assert file_stem("null_distribution", "fig-null-distribution-k8") == "null_distribution--k8"


def test_collected_files_are_the_embedded_figure_and_repeats_are_numbered():
    with collecting_files() as files:
        shown = []
        for _ in range(2):
            fig, ax = plt.subplots(figsize=(4, 3))
            ax.plot([0, 1], [1, 0])
            ax.set_xlabel("small", fontsize=7)
            shown.append(embed(fig, "expert_distance", "fig-expert-distance-gate", "t", "a"))
            plt.close(fig)
    assert [f.stem for f in files] == ["expert_distance--gate", "expert_distance--gate-2"]
    assert [s.file for s in shown] == [f.stem for f in files]
    assert base64.b64decode(shown[0].uri.split(",", 1)[1]) == files[0].data["svg"]
    assert files[0].data["png"].startswith(b"\x89PNG")
    assert shown[0].width_in == 4.0 and shown[0].smallest_pt == 7.0
    outside = embed(plt.figure(), "expert_distance", "x", "t", "a")  # nothing collected outside the block
    assert outside.file == "expert_distance--x" and len(files) == 2


def test_smallest_font_ignores_empty_and_hidden_text():
    fig, ax = plt.subplots()
    ax.set_title("big", fontsize=14)
    ax.text(0, 0, "", fontsize=2)
    ax.text(0, 0, "hidden", fontsize=3).set_visible(False)
    ax.tick_params(labelsize=9)
    assert smallest_font_pt(fig) == 9.0
    plt.close(fig)
