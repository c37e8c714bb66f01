"""The stage runner and the pieces of build() that need no model: skipping by fingerprint,
typed outputs rebuilt from records, what --force and --from redo, and compare's variant recipes."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from ollama_ft.context import BuildContext
from ollama_ft.pipeline import STAGES, BuildOptions, start_over
from ollama_ft.recipe import load_recipe
from ollama_ft.runs import RunDir, StageRecord
from ollama_ft.stages import Matrix, Runner, imatrix, registered_here

DEMO = Path(__file__).parent.parent / "recipes" / "tiny-demo.toml"


class Events:
    def __init__(self):
        self.seen: list[tuple[str, str]] = []

    def stage(self, name: str, status: str, detail: str = "") -> None:
        self.seen.append((name, status))

    def progress(self, name: str, done: int, total: int, detail: str = "") -> None:
        pass


def _context(tmp_path: Path, **recipe_changes) -> BuildContext:
    recipe = load_recipe(DEMO)
    if recipe_changes:
        recipe = recipe.model_copy(update={"export": recipe.export.model_copy(update=recipe_changes)})
    run = RunDir(tmp_path / "run")
    return BuildContext(recipe, BuildOptions(reporter=Events()), run, "http://127.0.0.1:1", "m", None, None, None,
                        None, [], [], "", [])


def test_a_stage_runs_once_then_is_rebuilt_from_its_record(tmp_path: Path) -> None:
    ctx = _context(tmp_path)
    calls = []

    def work() -> dict:
        calls.append(1)
        return {"answer": len(calls)}

    first = Runner(ctx, ctx.run).stage("s", "key-1", work)
    again = Runner(ctx, ctx.run)
    second = again.stage("s", "key-1", work)
    assert calls == [1] and second.outputs == first.outputs == {"answer": 1}
    assert second.finished_at == first.finished_at and again.skipped == ["s"] and again.ran == []
    assert again.metrics["s"]["skipped"] is True
    assert Runner(ctx, ctx.run).stage("s", "key-2", work).outputs == {"answer": 2}   # inputs changed
    assert Runner(ctx, ctx.run).stage("s", "key-2", work, lambda o: False).outputs == {"answer": 3}   # files gone
    assert ctx.options.reporter.seen == [("s", "start"), ("s", "done"), ("s", "skip"), ("s", "start"), ("s", "done"),
                                         ("s", "start"), ("s", "done")]
    log = ctx.run.path("build.log").read_text()
    assert "s skipped (fingerprint key-1 unchanged)" in log and log.count("s done in") == 3


def test_a_failed_stage_leaves_no_record_and_says_why_in_the_log(tmp_path: Path) -> None:
    ctx = _context(tmp_path)

    def broken() -> dict:
        raise RuntimeError("disk on fire")

    runner = Runner(ctx, ctx.run)
    try:
        runner.stage("s", "k", broken)
    except RuntimeError:
        pass
    assert ctx.run.read_record("s") is None and runner.ran == []
    assert "s failed after" in ctx.run.path("build.log").read_text()


def test_a_nested_runner_counts_as_one_stage_and_stays_off_the_display(tmp_path: Path) -> None:
    ctx = _context(tmp_path)
    outer = Runner(ctx, ctx.run)
    nested = Runner(ctx, RunDir(ctx.run.path("baseline")), report=False)
    nested.stage("convert", "k", lambda: {"x": 1})
    outer.group("baseline", nested, 1.5, {"model": "m:base"})
    assert outer.ran == ["baseline"] and outer.metrics["baseline"]["stages"]["convert"]["x"] == 1
    assert ctx.options.reporter.seen == [("baseline", "done")]
    assert "baseline/convert done" in ctx.run.path("build.log").read_text()
    again_outer, again_nested = Runner(ctx, ctx.run), Runner(ctx, RunDir(ctx.run.path("baseline")), report=False)
    again_nested.stage("convert", "k", lambda: {"x": 2})
    again_outer.group("baseline", again_nested, 0.1, {"model": "m:base"})
    assert again_outer.skipped == ["baseline"] and again_outer.metrics["baseline"]["skipped"] is True


def test_force_and_from_redo_the_right_records_including_the_baselines_own(tmp_path: Path) -> None:
    run = RunDir(tmp_path / "run")
    baseline = RunDir(run.path("baseline"))

    def fill() -> None:
        for stage in STAGES:
            run.write_record(StageRecord(stage, "k"))
        for stage in ("convert", "quantize", "register"):
            baseline.write_record(StageRecord(stage, "k"))

    fill()
    start_over(run, BuildOptions(from_stage="eval"))
    assert [s for s in STAGES if run.read_record(s)] == list(STAGES[:-1]) and baseline.read_record("convert")
    start_over(run, BuildOptions(from_stage="register"))
    assert [s for s in STAGES if run.read_record(s)] == list(STAGES[:STAGES.index("register")])
    assert baseline.read_record("convert") is None
    fill()
    start_over(run, BuildOptions(force=True))
    assert not any(run.read_record(s) for s in STAGES) and baseline.read_record("register") is None


def test_the_register_record_names_the_model_this_run_owns(tmp_path: Path) -> None:
    run = RunDir(tmp_path / "run")
    assert registered_here(run) is None
    run.write_record(StageRecord("register", "k", {"name": "m", "host": "http://h:1"}))
    assert registered_here(run) == ("m", "http://h:1")


def test_imatrix_none_and_a_file_need_no_stage(tmp_path: Path) -> None:
    ctx = _context(tmp_path)
    runner = Runner(ctx, ctx.run)
    assert imatrix(ctx, runner, None) == Matrix(None, None)
    matrix_file = tmp_path / "mine.gguf"
    matrix_file.write_bytes(b"GGUF")
    given = imatrix(replace(ctx, recipe=_context(tmp_path, imatrix=str(matrix_file)).recipe), runner, None)
    assert given.path == matrix_file and len(given.fingerprint) == 64 and runner.ran == []


def test_a_qlora_variant_is_a_changed_recipe_not_a_pipeline_flag() -> None:
    from ollama_ft.compare import variant_recipe

    demo = load_recipe(DEMO)
    recipe = demo.model_copy(update={"train": demo.train.model_copy(update={"method": "lora"})})
    assert variant_recipe(recipe, "peft") is recipe
    assert variant_recipe(demo, "peft-qlora").train.method == "full"   # full fine-tuning stays full
    four_bit = variant_recipe(recipe, "unsloth-qlora")
    assert four_bit.model.load_in_4bit and four_bit.train.method == "qlora"
    assert not recipe.model.load_in_4bit and recipe.train.method == "lora"


def test_method_variants_train_that_method_at_its_own_learning_rate() -> None:
    from ollama_ft.compare import METHOD_LEARNING_RATES, parse_variants, variant_recipe

    demo = load_recipe(DEMO)
    lora = demo.model_copy(update={"train": demo.train.model_copy(update={"method": "lora", "learning_rate": 1e-3})})
    assert parse_variants("peft-lora,peft-prompt_tuning,peft-p_tuning") == ["peft-lora", "peft-prompt_tuning",
                                                                           "peft-p_tuning"]
    assert variant_recipe(lora, "peft-lora") is lora
    for method in ("prompt_tuning", "p_tuning"):
        changed = variant_recipe(lora, f"peft-{method}")
        assert (changed.train.method, changed.train.learning_rate) == (method, METHOD_LEARNING_RATES[method])
        assert changed.train.num_virtual_tokens == lora.train.num_virtual_tokens and changed.data == lora.data
    assert variant_recipe(demo, "peft-lora").train.learning_rate == demo.train.learning_rate


def test_a_soft_prompt_opens_the_template_once_and_the_baseline_gets_none(tmp_path: Path) -> None:
    """The prefix goes before the family's template (a .Messages template renders once per
    request), a sampled soft token would stop the answer, num_keep keeps the prefix (and the BOS
    the template writes after it) on a context shift; the base the baseline registers has none."""
    from ollama_ft.soft_prompt import STOP_TEXT, SoftTokens
    from ollama_ft.stages import modelfile_spec
    from ollama_ft.template_match import choose_template

    template = choose_template("gemma", None, "tiny:llama")
    ctx = replace(_context(tmp_path), template=template)
    soft = SoftTokens(["<|soft_prompt_0|>", "<|soft_prompt_1|>"], [9, 10], "<bos>")
    spec = modelfile_spec(ctx, tmp_path / "m.gguf", soft)
    assert spec.template == "<|soft_prompt_0|><|soft_prompt_1|><bos>" + template.go_template
    assert STOP_TEXT == "<|soft_prompt_" and spec.stops[-1] == STOP_TEXT and spec.parameters["num_keep"] == 3
    plain = modelfile_spec(ctx, tmp_path / "base.gguf")
    assert plain.template == template.go_template and STOP_TEXT not in plain.stops
    assert "num_keep" not in plain.parameters
    bigger = replace(ctx, recipe=ctx.recipe.model_copy(update={"ollama": ctx.recipe.ollama.model_copy(
        update={"parameters": {"num_keep": 24}})}))
    assert modelfile_spec(bigger, tmp_path / "m.gguf", soft).parameters["num_keep"] == 24


def test_compare_measures_the_other_variants_when_a_stage_refuses_one(tmp_path: Path, monkeypatch) -> None:
    """A soft prompt that never stops fails the smoke stage: the report still has the variants that
    finished, names the one that did not and why; only when every variant fails does compare raise."""
    from types import SimpleNamespace

    import pytest

    from ollama_ft import compare as compare_module
    from ollama_ft.errors import StageError

    recipe = load_recipe(DEMO)
    built = []

    def fake_build(changed, options):
        if changed.train.method == "prompt_tuning":
            raise StageError("smoke test: m did not stop within 128 tokens", "check the template")
        built.append(options.variant)
        return SimpleNamespace(host="h", model_name=f"m:{options.variant}")

    captured = {}
    monkeypatch.setattr(compare_module, "build", fake_build)
    monkeypatch.setattr(compare_module, "measure_ollama_speed", lambda host, model: {})
    monkeypatch.setattr("ollama_ft.report.build_report", lambda recipe, results, speeds, env: {"variants": results})
    monkeypatch.setattr("ollama_ft.report.write_report", lambda report, results, out: captured.update(report))
    report = compare_module.compare(recipe, ["peft-lora", "peft-prompt_tuning"],
                                    BuildOptions(reporter=Events(), runs_root=tmp_path))
    assert built == ["peft-lora"] and list(report["variants"]) == ["peft-lora"]
    assert report["failed"] == {"peft-prompt_tuning": "smoke test: m did not stop within 128 tokens (check the template)"}
    assert captured["failed"] == report["failed"]
    with pytest.raises(StageError, match="every variant failed; peft-prompt_tuning: smoke test"):
        compare_module.compare(recipe, ["peft-prompt_tuning"], BuildOptions(reporter=Events(), runs_root=tmp_path))


def test_the_report_names_the_variants_that_did_not_finish() -> None:
    from ollama_ft.report import render_markdown

    report = {"recipe": "r.toml", "seed": 1, "repeats": {"peft-lora": 1}, "verdicts": [], "environment": {},
              "variants": {"peft-lora": {"train_seconds": 3.0, "training_reused_from": None}},
              "failed": {"peft-p_tuning": "smoke test: did not stop"}}
    text = render_markdown(report)
    assert "## Variants that did not finish\n\n- peft-p_tuning: smoke test: did not stop" in text
