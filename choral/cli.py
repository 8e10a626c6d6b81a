"""The ``choral`` command line. ``choral generate --help`` tells a newcomer what they need."""

from __future__ import annotations

import argparse
import logging
import sys
import time
from collections.abc import Sequence

from choral.config import DEFAULT_MODEL
from choral.errors import ChoralError


def add_engine_args(parser: argparse.ArgumentParser) -> None:
    """Options that size and place the engine (shared by every command that loads a model)."""
    g = parser.add_argument_group("engine")
    g.add_argument("--model", default=DEFAULT_MODEL,
                   help=f"bundled model name, .gguf file or HF model directory (default: {DEFAULT_MODEL})")
    g.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="weights and KV dtype; auto = bf16 where the CPU/GPU has it, else fp32")
    g.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default: cpu)")
    g.add_argument("--kv-cache-tokens", type=int, default=None, help="KV cache capacity in tokens")
    g.add_argument("--block-size", type=int, default=16, help="tokens per KV block (default: 16)")
    g.add_argument("--max-model-len", type=int, default=None, help="context limit (default: the model's)")
    g.add_argument("--max-num-seqs", type=int, default=64, help="sequences per forward (default: 64)")
    g.add_argument("--max-num-batched-tokens", type=int, default=2048,
                   help="tokens per forward, prompt chunks + decodes (default: 2048)")
    g.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")


def engine_options(args: argparse.Namespace) -> dict[str, object]:
    return dict(model=args.model, dtype=args.dtype, device=args.device, kv_cache_tokens=args.kv_cache_tokens,
                block_size=args.block_size, max_model_len=args.max_model_len, max_num_seqs=args.max_num_seqs,
                max_num_batched_tokens=args.max_num_batched_tokens, num_threads=args.threads)


def cmd_generate(args: argparse.Namespace) -> int:
    from choral import LLM, SamplingParams

    prompts: list[str] = list(args.prompt or [])
    if args.prompts_file:
        with open(args.prompts_file, encoding="utf-8") as f:
            prompts.extend(line.rstrip("\n") for line in f if line.strip())
    if not prompts:
        print("choral generate: give at least one prompt (positional or --prompts-file)", file=sys.stderr)
        return 2
    schema = args.json_schema
    if schema is not None and not schema.lstrip().startswith("{"):
        with open(schema, encoding="utf-8") as f:  # a path to a schema file
            schema = f.read()
    grammar = None
    if args.grammar_file:
        with open(args.grammar_file, encoding="utf-8") as f:
            grammar = f.read()
    params = SamplingParams(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k, min_p=args.min_p,
                            repetition_penalty=args.repetition_penalty, presence_penalty=args.presence_penalty,
                            frequency_penalty=args.frequency_penalty, stop=tuple(args.stop or ()),
                            max_tokens=args.max_tokens, seed=args.seed, ignore_eos=args.ignore_eos, n=args.n,
                            beam_width=args.beam_width, json_schema=schema, regex=args.regex, grammar=grammar)
    load_start = time.perf_counter()
    llm = LLM(**engine_options(args))  # type: ignore[arg-type]
    loaded = time.perf_counter() - load_start
    inputs: list[object] = [[{"role": "user", "content": p}] for p in prompts] if not args.raw else list(prompts)
    start = time.perf_counter()
    outputs = llm.generate(inputs, params, use_tqdm=not args.quiet)
    elapsed = time.perf_counter() - start
    for prompt, out in zip(prompts, outputs, strict=True):
        print(f"\n### {prompt}")
        for completion in out.outputs:
            label = f"#{completion.index} " if len(out.outputs) > 1 else ""
            print(f"{label}{completion.text}  [{completion.finish_reason}]")
    generated = sum(len(c.token_ids) for o in outputs for c in o.outputs)
    prompt_tokens = sum(len(o.prompt_token_ids) for o in outputs)
    kv = llm.engine.kv_size
    print(f"\n{len(outputs)} request(s): {prompt_tokens} prompt + {generated} generated tokens in "
          f"{elapsed:.2f} s = {generated / max(elapsed, 1e-9):.1f} tok/s "
          f"(load {loaded:.1f} s, {llm.engine.loaded.model.dtype}, KV cache {kv.num_tokens} tokens / "
          f"{kv.num_bytes / 2**20:.0f} MiB)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="choral",
        description="choral: run many LLM conversations and requests through one model at once.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log engine start-up details")
    sub = parser.add_subparsers(dest="command", required=True)
    gen = sub.add_parser(
        "generate",
        help="generate completions for prompts, batched",
        description="Generate for one or more prompts in one batch. Prompts are sent as chat messages "
                    "through the model's chat template unless --raw is given. Example:\n"
                    "  choral generate 'What is the capital of France?' 'Name three colors.'",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    gen.add_argument("prompt", nargs="*", help="prompts (each one a separate request)")
    gen.add_argument("--prompts-file", help="a file with one prompt per line")
    gen.add_argument("--raw", action="store_true", help="send prompts as plain text, without the chat template")
    gen.add_argument("--max-tokens", type=int, default=64, help="tokens to generate per prompt (default: 64)")
    gen.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default: 0)")
    gen.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (default: 1)")
    gen.add_argument("--top-k", type=int, default=0, help="keep the k most likely tokens (default: all)")
    gen.add_argument("--min-p", type=float, default=0.0, help="drop tokens below min-p x the top one (default: 0)")
    gen.add_argument("--repetition-penalty", type=float, default=1.0, help="HF repetition penalty (default: 1)")
    gen.add_argument("--presence-penalty", type=float, default=0.0, help="OpenAI presence penalty (default: 0)")
    gen.add_argument("--frequency-penalty", type=float, default=0.0, help="OpenAI frequency penalty (default: 0)")
    gen.add_argument("--stop", action="append", help="a stop string (repeatable)")
    gen.add_argument("--n", type=int, default=1, help="completions per prompt, sharing its KV (default: 1)")
    gen.add_argument("--beam-width", type=int, default=1, help="beam search with this many beams (default: off)")
    gen.add_argument("--json-schema", help="constrain output to a JSON schema (inline JSON or a file path)")
    gen.add_argument("--regex", help="constrain output to a regular expression")
    gen.add_argument("--grammar-file", help="constrain output to a GBNF/EBNF or Lark grammar file")
    gen.add_argument("--seed", type=int, default=None, help="per-request sampling seed")
    gen.add_argument("--ignore-eos", action="store_true", help="keep generating past end-of-sequence")
    gen.add_argument("--quiet", action="store_true", help="no progress bar")
    add_engine_args(gen)
    gen.set_defaults(func=cmd_generate)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        return int(args.func(args))
    except ChoralError as e:
        print(f"choral: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
