"""Recipe validation: every shipped recipe loads; every bad recipe is refused before any model
loads, with all problems at once, each naming the field, the bad value and the fix."""

from pathlib import Path

import pytest

from ollama_ft.errors import RecipeError
from ollama_ft.recipe import QUANT_TYPES, load_recipe, parse_recipe

ROOT = Path(__file__).resolve().parent.parent
RECIPES = sorted((ROOT / "recipes").glob("*.toml"))

GOOD = """
[model]
base = "tiny:llama"
[data]
train = "data.jsonl"
[ollama]
name = "tr-test"
"""


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_every_shipped_recipe_validates(path):
    recipe = load_recipe(path)
    assert recipe.ollama.name
    for value in recipe.data.train:
        assert recipe.resolve(value).is_file(), value


def test_shipped_recipes_cover_the_promised_models():
    bases = {load_recipe(p).model.base for p in RECIPES}
    assert {"tiny:llama", "Qwen/Qwen2.5-0.5B-Instruct", "meta-llama/Llama-3.2-1B-Instruct",
            "TURKCELL/Turkcell-LLM-7b-v1", "~/.cache/ollama-ft/models/gemma-3-270m-q4_k_m.gguf"} <= bases
    turkcell = next(load_recipe(p) for p in RECIPES if load_recipe(p).model.base.startswith("TURKCELL"))
    assert turkcell.train.method == "qlora" and turkcell.model.load_in_4bit


def _problems(text: str, tmp_path: Path) -> list[str]:
    (tmp_path / "data.jsonl").write_text('{"text": "merhaba"}\n', encoding="utf-8")
    with pytest.raises(RecipeError) as info:
        parse_recipe(text, tmp_path / "r.toml")
    return info.value.problems


def test_good_recipe_parses_and_resolves_paths(tmp_path):
    (tmp_path / "data.jsonl").write_text('{"text": "merhaba"}\n', encoding="utf-8")
    recipe = parse_recipe(GOOD, tmp_path / "r.toml")
    assert recipe.resolve(recipe.data.train[0]) == tmp_path / "data.jsonl"
    assert recipe.export.quantization == "q4_k_m" and recipe.train.method == "lora"


@pytest.mark.parametrize("patch, expected", [
    (("[model]", "[model]\nmax_seq_lenght = 512"), "model.max_seq_lenght: unknown key; did you mean 'max_seq_length'?"),
    (("[data]", "[data]\nformt = 'text'"), "data.formt: unknown key; did you mean 'format'?"),
    (("[ollama]", "[trian]\nrank = 8\n[ollama]"), "trian: unknown key; did you mean 'train'?"),
    (("[ollama]", "[train]\nrank = 0\n[ollama]"), "train.rank = 0: Input should be greater than or equal to 1"),
    (("[ollama]", "[train]\nlearning_rate = -1\n[ollama]"), "train.learning_rate = -1: Input should be greater than 0"),
    (("[ollama]", "[train]\nrank = 'big'\n[ollama]"), "train.rank = 'big': Input should be a valid integer"),
    (("[ollama]", "[train]\nmethod = 'lorra'\n[ollama]"), "train.method = 'lorra': Input should be 'lora'"),
    (("[ollama]", "[export]\nquantization = 'q4_km'\n[ollama]"), "export.quantization = 'q4_km': did you mean 'q4_k_m'?"),
    (("[ollama]", "[export]\nquantization = 'q3'\n[ollama]"), "llama.cpp offers: f32, f16"),
    (('name = "tr-test"', 'name = "bad name!"'), "ollama.name = 'bad name!': Ollama names are"),
    (('name = "tr-test"', 'name = "-starts-with-dash"'), "ollama.name = '-starts-with-dash'"),
    (('base = "tiny:llama"', 'base = "tiny:gpt"'), "model.base = 'tiny:gpt': unknown tiny base"),
    (('base = "tiny:llama"', 'base = "./nowhere"'), "model.base = './nowhere': no such folder"),
    (('train = "data.jsonl"', 'train = "missing.jsonl"'), "data.train = 'missing.jsonl': no such file"),
    (("[model]", "[model]\nchat_template = 'vicuna'"), "model.chat_template = 'vicuna': Input should be 'auto'"),
    (("[model]", "[model]\nmax_seq_length = 8"), "model.max_seq_length = 8: Input should be greater than or equal to 16"),
    (("[data]", "[data]\nvalidation_split = 0.9"), "data.validation_split = 0.9: Input should be less than 0.5"),
    (("[ollama]", "[train]\ndropout = 1.5\n[ollama]"), "train.dropout = 1.5: Input should be less than 1"),
    (("[ollama]", "[train]\noptimizer = 'adam'\n[ollama]"), "train.optimizer = 'adam': Input should be"),
    (('name = "tr-test"', 'name = "tr-test"\nparameters = { temperature = [1, 2] }'),
     "ollama.parameters.temperature"),
    (("[ollama]", "[model.x]\n[train]\nmethod = 'full'\n[ollama]", "load4"),
     "model.load_in_4bit = true with train.method = 'full'"),
    (("[ollama]", "[train]\nmethod = 'qlora'\n[ollama]"), "train.method = 'qlora' needs model.load_in_4bit = true"),
    (("[ollama]", "[train]\nmethod = 'prefix_tuning'\n[ollama]"), "no GGUF or Ollama runner can carry"),
    (("[ollama]", "[model.x]\n[train]\nmethod = 'prompt_tuning'\n[ollama]", "load4"),
     "model.load_in_4bit = true with train.method = 'prompt_tuning'"),
    (("[ollama]", "[eval]\nsuite = 'no-suite.toml'\n[ollama]"), "eval.suite = 'no-suite.toml': no such file"),
    (("[model]\n", ""), "model: required, but missing"),
    (("[ollama]", "[train]\nspeedups = ['fused_cross_entropy']\n[ollama]"), "train.speedups"),
])
def test_bad_recipe_is_refused_with_field_value_and_fix(tmp_path, patch, expected):
    old, new, *flags = patch
    text = GOOD.replace(old, new, 1)
    if flags:  # 4-bit loading set in [model] as well
        text = text.replace("[model.x]\n", "").replace('base = "tiny:llama"', 'base = "tiny:llama"\nload_in_4bit = true')
    problems = _problems(text, tmp_path)
    assert any(expected in p for p in problems), problems


def test_soft_prompt_methods_are_accepted(tmp_path):
    for method in ("prompt_tuning", "p_tuning"):
        text = GOOD.replace("[ollama]", f"[train]\nmethod = '{method}'\nnum_virtual_tokens = 12\n[ollama]", 1)
        (tmp_path / "data.jsonl").write_text('{"text": "merhaba"}\n', encoding="utf-8")
        recipe = parse_recipe(text, tmp_path / "r.toml")
        assert (recipe.train.method, recipe.train.num_virtual_tokens) == (method, 12)


def test_all_problems_reported_at_once(tmp_path):
    text = GOOD.replace("[model]", "[model]\nmax_seq_lenght = 5\ndtype = 'fp8'").replace(
        'name = "tr-test"', 'name = "no spaces allowed"')
    problems = _problems(text, tmp_path)
    assert len(problems) == 3, problems


def test_malformed_toml_names_line_and_column(tmp_path):
    problems = _problems("[model]\nbase = \n", tmp_path)
    assert "not valid TOML" in problems[0] and "line 2" in problems[0]


def test_quant_types_exist_in_llama_cpp():
    llama_cpp = pytest.importorskip("llama_cpp")
    from ollama_ft.quantize import ftype_for

    assert ftype_for("q4_k_m") == llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_K_M == 15
    for name in QUANT_TYPES:
        ftype_for(name)  # raises if llama.cpp lacks it
