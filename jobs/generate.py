"""medreason generate: answer questions with a run's model (prompt-based inference)."""

from __future__ import annotations

import json
import logging

import click

from jobs.common import COMMON_HELP, common_options, exit_codes, make_context

log = logging.getLogger("medreason.generate")


def _read_questions(question: str | None, options: str | None, input_file: str | None) -> list[dict]:
    from medreason.benchmarks import coerce_options, jsonl_objects, options_string
    from medreason.errors import InputError

    if bool(question) == bool(input_file):
        raise click.UsageError("pass either --question TEXT (with optional --options) or --input FILE.jsonl")
    rows: list[tuple[str, object]] = []
    if question:
        rows.append((question, options.replace("\\n", "\n") if options else None))
    else:
        try:
            with open(input_file, encoding="utf-8") as fh:
                for lineno, row in jsonl_objects(fh, f"--input {input_file}"):
                    if not str(row.get("question") or "").strip():
                        raise InputError(f"--input {input_file} line {lineno}: needs a \"question\" field")
                    rows.append((str(row["question"]), row.get("options")))
        except FileNotFoundError:
            raise InputError(f"--input: file not found: {input_file}") from None
    records = []
    for i, (q, opts) in enumerate(rows):
        options_map = coerce_options(opts) if opts else {}
        if opts and not options_map:
            raise InputError(f"question {i + 1}: could not read options {opts!r}; write them as "
                             "'A. text' lines (or a JSON {\"A\": ...} object in --input files)")
        records.append({
            "uid": f"input:{i}", "dataset_name": "input", "id_in_dataset": i, "question": q.strip(),
            "options": options_string(options_map) if options_map else "", "options_map": options_map,
            "reasoning": "", "answer": "", "answer_letter": "",
        })
    return records


@click.command(help=f"""Answer questions with the run's model and print the reasoning and the letter.

\b
  medreason generate --run demo --question "Drug of choice for absence seizures?" \\
      --options "A. Ethosuximide\\nB. Carbamazepine\\nC. Phenytoin"
  medreason generate --run demo --input questions.jsonl --json   (question/options per line)

--model: merged (the merge stage's model), adapter (base + the final adapter) or base;
the default is merged when a merge is committed, else adapter. The prompt is built with
the run's data.template, like in training and evaluation; greedy decoding.
{COMMON_HELP}""")
@common_options
@click.option("--question", default=None, help="The question text.")
@click.option("--options", "options_text", default=None, help="Options as 'A. text' lines ('\\n' separates them).")
@click.option("--input", "input_file", default=None, type=click.Path(dir_okay=False),
              help="A .jsonl file with question (and options) per line.")
@click.option("--model", "which", type=click.Choice(["merged", "adapter", "base"]), default=None,
              help="Which model answers [default: merged if committed, else adapter].")
@click.option("--max-new-tokens", type=click.IntRange(1), default=None,
              help="Generation length (default: eval.max_new_tokens).")
@click.option("--json", "as_json", is_flag=True, default=False, help="Print one JSON object per answer.")
@exit_codes
def generate(preset, config_file, overrides, store, run_id, force, verbose, question, options_text,
             input_file, which, max_new_tokens, as_json) -> None:
    from medreason.errors import InputError
    from medreason.evaluation.generation import build_prompt, encode_prompt, generate_texts
    from medreason.extraction import extract_answer
    from medreason.loading import load_for_inference

    ctx = make_context(preset, config_file, overrides, store, run_id, force)
    cfg, st, run = ctx.config, ctx.store, ctx.run_id
    records = _read_questions(question, options_text, input_file)

    import torch

    device = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    if which is None:
        if st.is_committed(st.stage_rel(run, "merge")):
            which = "merged"
        elif st.is_committed(st.stage_rel(run, "train")):
            which = "adapter"
        else:
            raise InputError(f"run {run!r} has no committed train or merge stage: train it first, "
                             "or answer with the base model: --model base")
    checkpoint = {"merged": "merged", "adapter": "final", "base": "none"}[which]
    (loaded,) = load_for_inference(st, run, checkpoint, cfg, device,
                                   merge_hint="run `medreason merge` first, or use --model adapter")
    log.info("answering %d question(s) with the %s model of run %r", len(records), which, run)

    template, tokenizer = cfg.data.template, loaded.tokenizer
    prompts = [build_prompt(r, template, tokenizer) for r in records]
    ids = [encode_prompt(tokenizer, p, template) for p in prompts]
    with loaded.context():  # the adapter folded in, by medreason.loading's one rule
        texts = generate_texts(loaded.model, tokenizer, ids, max_new_tokens or cfg.eval.max_new_tokens,
                               cfg.eval.batch_size, desc="generate", max_batch_tokens=cfg.eval.max_batch_tokens,
                               cache_bucket_tokens=cfg.eval.cache_bucket_tokens, compile_mode=cfg.eval.compile,
                               decode_attention=cfg.eval.decode_attention)
    for i, (rec, text) in enumerate(zip(records, texts, strict=True)):
        letter, method = extract_answer(text, rec["options_map"]) if rec["options_map"] else (None, "no options")
        if as_json:
            click.echo(json.dumps({"question": rec["question"], "options": rec["options_map"], "model": which,
                                   "generated": text, "answer": letter, "parse_method": method},
                                  ensure_ascii=False))
            continue
        if len(records) > 1:
            click.echo(f"=== Question {i + 1} ===")
        click.echo(text)
        click.echo("")
        if rec["options_map"]:
            shown = f"{letter}. {rec['options_map'][letter]}" if letter else "could not be parsed"
            click.echo(f"Answer: {shown}  [{method}]")


if __name__ == "__main__":
    generate()
