"""Task files for the evaluation tests, in lm-evaluation-harness's own YAML format, over
JSON-lines data written beside them (absolute data_files: the harness reads a relative
one from the working dir)."""

from __future__ import annotations

import json
from pathlib import Path


def header(name: str, data: Path) -> str:
    """Every task's first lines: its name and its JSON-lines data as the test split."""
    return f"""task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
"""


def write_rows(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def generative(folder: Path, name: str, data: Path, max_gen: int = 12, until=("\n",),
               metrics=("exact_match", "bleu", "chrf", "rougeL")) -> Path:  # fmt: skip
    """`prompt` -> `completion`, greedy, ended by `until` or the end token."""
    lines = "\n".join(f"  - metric: {m}" for m in metrics)
    f = folder / f"{name}.yaml"
    f.write_text(
        header(name, data)
        + f"""output_type: generate_until
doc_to_text: "{{{{prompt}}}}"
doc_to_target: "{{{{completion}}}}"
target_delimiter: ""
generation_kwargs:
  until: {json.dumps(list(until))}
  max_gen_toks: {max_gen}
  do_sample: false
metric_list:
{lines}
"""
    )
    return f


def multiple_choice(folder: Path, name: str, data: Path) -> Path:
    """`prompt` then one of `choices`, `label` the right one: acc and acc_norm."""
    f = folder / f"{name}.yaml"
    f.write_text(
        header(name, data)
        + """output_type: multiple_choice
doc_to_text: "{{prompt}}"
doc_to_choice: "{{choices}}"
doc_to_target: label
target_delimiter: ""
metric_list:
  - metric: acc
  - metric: acc_norm
"""
    )
    return f


def rolling(folder: Path, name: str, data: Path) -> Path:
    """Perplexity of each row's `text` (longer texts: several windows)."""
    f = folder / f"{name}.yaml"
    f.write_text(
        header(name, data)
        + """output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: "{{text}}"
metric_list:
  - metric: word_perplexity
  - metric: bits_per_byte
"""
    )
    return f


def loglikelihood(folder: Path, name: str, data: Path) -> Path:
    """log p(completion | prompt) and whether greedy gives it."""
    f = folder / f"{name}.yaml"
    f.write_text(
        header(name, data)
        + """output_type: loglikelihood
doc_to_text: "{{prompt}}"
doc_to_target: "{{completion}}"
target_delimiter: ""
metric_list:
  - metric: perplexity
  - metric: acc
"""
    )
    return f
