"""`moelens atlas`: every analysis that applies, one report, reused on a second call; a dense
model gets what applies to it; the report opens in a browser, offline, with every section painted."""

from __future__ import annotations

import re
import subprocess

import matplotlib.image as mpimg
import pytest

import moelens as ml
from moelens.atlas import atlas, plan_atlas
from moelens.errors import ConfigError

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def zoo_atlas(small_zoo, tmp_path_factory):
    out = tmp_path_factory.mktemp("atlas") / "zoo"
    return atlas(small_zoo.base, out, tuned=small_zoo.tuned, device="cpu", trace_limit=6)


def test_atlas_writes_every_run_and_a_report_with_every_section(zoo_atlas):
    runs = zoo_atlas.runs
    expected = {"alignment-base", "alignment-tuned", "distance-base-tuned", "distance-within", "modules",
                "trace-block-base", "trace-knockout-base", "trace-block-tuned", "trace-knockout-tuned", "trace-restore-base", "route-base",
                "router-norms-base", "router-norms-tuned"}
    assert expected <= set(runs)
    assert {"cluster-hc-smoe", "cluster-m-smoe", "distance-hc-smoe-permuted", "distance-m-smoe"} <= set(runs)
    for name in runs:
        assert ml.load_run(zoo_atlas.out / "runs" / name).manifest["status"] == "complete"
    html = zoo_atlas.report.read_text()
    analyses = {r.manifest["analysis"] for r in runs.values()}
    assert analyses == {"router_alignment", "expert_distance", "module_metrics", "interventions", "router_edits", "clustering", "merge_cost",
                        "router_norms"}
    assert len(re.findall(r'<section id="[^"]+" class="part"', html)) == len(analyses)  # one section per analysis
    assert "How to reproduce" in html and "moelens trace" in html and "torch" in html
    assert zoo_atlas.notes == []
    stems = {p.stem for p in zoo_atlas.figures}
    # the seed-003 figure is attention knockout; knockout and causal tracing are filed under their own names
    assert {"comparison_panels", "module_heatmap--modules-pair-corr", "trace_heatmap--trace-block-base", "trace_heatmap--trace-block-tuned",
            "trace_knockout--trace-knockout-base", "trace_knockout--trace-knockout-tuned", "trace_restore--trace-restore-base",
            "trace_indirect_effect--trace-restore-base", "route_routed_share--route-base", "route_jsd_heatmap--route-base",
            "route_migration--route-base"} <= stems
    assert {p.suffix for p in zoo_atlas.figures} == {".png", ".svg"}
    assert all(p.stat().st_size > 1000 for p in zoo_atlas.figures)
    # the seed-001 figure holds the base-tuned line and the four cluster pairings
    distance_runs = [r for n, r in runs.items() if r.manifest["analysis"] == "expert_distance" and "within" not in n]
    pairings = set()
    for r in distance_runs:
        pairings |= set(r["expert_distance"]["pairing"])
    assert {"base-tuned", "hc-smoe", "hc-smoe-permuted", "m-smoe", "m-smoe-permuted"} <= pairings


def test_the_figures_folder_holds_exactly_the_figures_the_report_shows(zoo_atlas):
    import base64

    html = zoo_atlas.report.read_text()
    shown = dict(re.findall(r'<img src="data:image/svg\+xml;base64,([^"]+)"[^>]*data-file="([^"]+)"', html))
    shown = {stem: payload for payload, stem in shown.items()}
    assert len(shown) == html.count("<img ")  # every figure of the report names its file
    files = sorted(p.name for p in (zoo_atlas.out / "figures").iterdir())
    assert files == sorted(f"{stem}{suffix}" for stem in shown for suffix in (".png", ".svg"))
    for stem, payload in shown.items():  # the very figure the report shows, byte for byte
        assert (zoo_atlas.out / "figures" / f"{stem}.svg").read_bytes() == base64.b64decode(payload), stem
    # seed 001: one figure with the base-tuned line and the four cluster pairings (six series with the within line)
    assert any(s.startswith("expert_distance--") for s in shown)


def test_a_second_call_reuses_every_finished_run(zoo_atlas, small_zoo):
    again = atlas(small_zoo.base, zoo_atlas.out, tuned=small_zoo.tuned, device="cpu", trace_limit=6)
    assert set(again.reused) == set(zoo_atlas.runs)
    assert again.report == zoo_atlas.report and again.report.stat().st_mtime == zoo_atlas.report.stat().st_mtime
    assert sorted(again.figures) == sorted(zoo_atlas.figures)


def test_a_dense_model_gets_module_metrics_and_interventions_and_a_note(tmp_path):
    from tests.analyses import interventions_fixtures as fx

    tok = fx.tokenizer()
    dense = fx.save_model(fx.llama_config(tok), tok, tmp_path / "dense")
    prompts = fx.write_prompts(tmp_path / "prompts.jsonl")
    result = atlas(dense, tmp_path / "atlas", prompts=prompts, device="cpu")
    assert set(result.runs) == {"modules", "trace-block-model", "trace-knockout-model", "trace-restore-model"}
    assert (tmp_path / "atlas" / ".moelens-atlas").is_file()  # marks the directory as an atlas a later call may update
    assert any("dense model" in n and "skipped" in n for n in result.notes)
    html = result.report.read_text()
    assert "dense model" in html and 'data-analysis="interventions"' in html


def test_a_forward_only_causal_lm_gets_interventions_and_a_note(tmp_path):
    """GPT-2: no weights read by name, so module metrics are skipped with a note; trace runs."""
    from tests.analyses import interventions_fixtures as fx

    tok = fx.tokenizer()
    gpt2 = fx.save_model(fx.causal_lm_config(tok, "gpt2"), tok, tmp_path / "gpt2")
    prompts = fx.write_prompts(tmp_path / "prompts.jsonl")
    result = atlas(gpt2, tmp_path / "atlas", prompts=prompts, device="cpu", restore_limit=0)
    assert set(result.runs) == {"trace-block-model", "trace-knockout-model"}  # --restore-limit 0: no causal tracing
    assert any("forward passes only" in n and "module metrics" in n for n in result.notes)
    assert 'data-analysis="interventions"' in result.report.read_text()


def test_bad_input_is_refused_before_anything_is_written(small_zoo, tmp_path):
    out = tmp_path / "never"
    with pytest.raises(ConfigError, match="not both"):
        plan_atlas(small_zoo.base, out, tuned=small_zoo.tuned, base=small_zoo.tuned)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a b"}\n')
    with pytest.raises(ConfigError, match='line 1: no "subject"'):
        atlas(small_zoo.base, out, prompts=bad)
    with pytest.raises(ConfigError, match="does not exist"):
        atlas(small_zoo.base, out, calibration=tmp_path / "missing.txt")
    assert not out.exists()


@pytest.mark.browser
def test_the_atlas_report_opens_offline_and_every_section_is_painted(zoo_atlas, tmp_path):
    from tests.report.test_browser import find_browser

    browser = find_browser()
    html = zoo_atlas.report.read_text()
    assert zoo_atlas.report.stat().st_size < 10 * 2**20
    assert not re.search(r'(src|href)\s*=\s*["\']?(https?:)?//', html), "the report names an external resource"
    # One page per section (the report's own head and styles, that section's body): a screenshot
    # of each must show text and figures, and the whole report must raise no console message.
    head = html[:html.index("<body")] + "<body><main>"
    sections = re.findall(r'(<section id="([^"]+)" class="part".*?</section>)', html, flags=re.S)
    assert len(sections) >= 4
    pages = [("top", zoo_atlas.report)]
    for body, anchor in sections:
        page = tmp_path / f"{anchor}.html"
        page.write_text(head + body + "</main></body></html>")
        pages.append((anchor, page))
    for anchor, page in pages:
        shot = tmp_path / f"{anchor}.png"
        command = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
                   f"--user-data-dir={tmp_path / 'profile'}", "--enable-logging=stderr", "--v=0",
                   f"--screenshot={shot}", "--window-size=1280,1400", page.as_uri()]
        done = subprocess.run(command, check=False, capture_output=True, text=True, timeout=180)
        assert done.returncode == 0, done.stderr[-2000:]
        assert not [line for line in done.stderr.splitlines() if "CONSOLE" in line], anchor
        pixels = mpimg.imread(shot)[..., :3].mean(axis=-1)
        assert pixels.std() > 0.05 and (pixels < 0.5).mean() > 0.002, f"section {anchor} is blank"


@pytest.mark.parametrize("text", ["moelens demo: the zoo's base and tuned models", "plain", "a b", "it's $HOME", 'say "hi"', "x'y\\z", "", "a!b'"])
def test_reproduce_commands_quote_each_word_for_the_shell(text):
    import subprocess

    from moelens.atlas import shell_quote

    quoted = shell_quote(text)
    assert subprocess.run(["bash", "-c", f"printf %s {quoted}"], capture_output=True, text=True, check=True).stdout == text
    if text == "moelens demo: the zoo's base and tuned models":
        assert quoted == '"' + text + '"'  # readable, not '…'"'"'…'


def test_a_second_call_with_another_trace_limit_is_refused_before_anything_is_written(zoo_atlas, small_zoo, capsys):
    from moelens.errors import ConfigError

    before = {p: p.stat().st_mtime_ns for p in zoo_atlas.out.rglob("*") if p.is_file()}
    for limit in (None, 7):
        with pytest.raises(ConfigError, match="written with --trace-limit 6 but this call asks for"):
            atlas(small_zoo.base, zoo_atlas.out, tuned=small_zoo.tuned, device="cpu", trace_limit=limit)
    assert {p: p.stat().st_mtime_ns for p in zoo_atlas.out.rglob("*") if p.is_file()} == before


@pytest.mark.parametrize(("layers", "window"), [(1, 1), (2, 1), (4, 1), (12, 2), (16, 3), (24, 5), (32, 6), (48, 9), (80, 15)])
def test_the_attention_knockout_window_keeps_geva_et_al_s_share_of_the_depth(layers, window):
    from moelens.atlas import block_window

    assert block_window(layers) == window


def test_the_trace_runs_say_what_they_traced(zoo_atlas, small_zoo):
    from moelens.atlas import block_window

    runs = zoo_atlas.runs
    depth = runs["trace-block-base"].model["n_layers"]
    options = {name: runs[name].manifest["options"] for name in runs if name.startswith("trace-")}
    assert options["trace-block-base"]["mode"] == "block" and options["trace-block-base"]["window"] == block_window(depth)
    assert options["trace-knockout-tuned"]["mode"] == "knockout" and "router" in options["trace-knockout-tuned"]["sites"]
    assert options["trace-restore-base"]["mode"] == "restore" and options["trace-restore-base"]["limit"] == 6  # at most --trace-limit
    assert runs["route-base"].manifest["options"]["limit"] == 6 and "moelens route" in zoo_atlas.report.read_text()
    html = zoo_atlas.report.read_text()
    assert f"--mode block --window {block_window(depth)} --limit 6" in html and "--mode restore --limit 6" in html
    assert f"attention knockout (window {block_window(depth)}): blocking" in html  # the headline names mode, window and site


def test_a_second_call_with_another_restore_limit_is_refused(zoo_atlas, small_zoo):
    with pytest.raises(ConfigError, match="written with --restore-limit 6 but this call asks for 3"):
        atlas(small_zoo.base, zoo_atlas.out, tuned=small_zoo.tuned, device="cpu", trace_limit=6, restore_limit=3)
    with pytest.raises(ConfigError, match="--restore-limit -1: give a whole number ≥ 0"):
        plan_atlas(small_zoo.base, zoo_atlas.out, tuned=small_zoo.tuned, restore_limit=-1)
