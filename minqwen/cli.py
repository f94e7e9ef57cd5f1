"""python -m minqwen {generate, chat, serve, info, quantize}: the command line.

Every MinqwenError becomes one line on stderr and exit status 2 (no traceback); a warning (a part of the
model not loaded) one line too.
"""
from __future__ import annotations

import argparse
import os
import sys
import warnings
from dataclasses import fields
from pathlib import Path

import numpy as np

from .errors import CheckpointError, ConstraintError, MinqwenError, TemplateError
from .formats.gguf import GGML_TYPES
from .formats.hub import resolve
from .formats.safetensors import STORED_NAMES, write_quantized_checkpoint
from .kernels import isa
from .kernels.ggml import GgmlMatrix
from .loader import load, open_checkpoint
from .network.weights import IGNORED, TensorSource, load_weights, unread_tensors
from .text.constraints import Constraint
from .text.generation import GenerationOptions, Stats, options_with_defaults, stream_tokens
from .text.reply import Delta, Reply
from .text.speculative import DRAFT_TOKENS

DEFAULT_MODEL = "Qwen/Qwen2.5-0.5B-Instruct"
DIM, RESET = "\033[2m", "\033[0m"


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    warnings.formatwarning = _warning_line
    try:
        return args.run(args)
    except MinqwenError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0


def _warning_line(message, category, filename, lineno, line=None) -> str:
    return f"warning: {message}\n"  # not Python's file:line and source line: the user did not write them


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="minqwen", description="Run Qwen checkpoints on the CPU.")
    commands = parser.add_subparsers(required=True, metavar="{generate,chat,serve,info,quantize}")

    gen = commands.add_parser("generate", help="stream a completion of one prompt")
    _model_options(gen)
    gen.add_argument("--prompt", required=True)
    _chat_options(gen)
    gen.add_argument("--no-chat", action="store_true", help="feed the raw prompt, without the chat template")
    _sampling_options(gen)
    _speculative_options(gen)
    gen.set_defaults(run=_generate)

    chat = commands.add_parser("chat", help="multi-turn chat (/reset, /exit)")
    _model_options(chat)
    _chat_options(chat)
    _sampling_options(chat)
    _speculative_options(chat)
    chat.set_defaults(run=_chat)

    serve = commands.add_parser("serve", help="an OpenAI-compatible HTTP server (continuous batching)")
    _model_options(serve)
    serve.add_argument("--host", default="127.0.0.1", help="address to bind (default: this machine only)")
    serve.add_argument("--port", type=int, default=8080)
    serve.add_argument("--parallel", type=int, default=4,
                       help="requests generated at once, each with its own cache of the whole context")
    serve.add_argument("--queue", type=int, default=32, help="requests that may wait for a slot; then 503")
    serve.add_argument("--api-key", default=None,
                       help="require `Authorization: Bearer KEY` (default: $MINQWEN_API_KEY, if set)")
    serve.add_argument("--model-name", default=None, help="the model id clients see (default: folder name)")
    _reasoning_budget_option(serve, " (every request's default; its thinking_budget_tokens chooses)")
    _speculative_options(serve)
    serve.set_defaults(run=_serve)

    quantize = commands.add_parser("quantize", help="write an int8 / int4 copy of a checkpoint")
    quantize.add_argument("--model", required=True, help="checkpoint folder or hub id")
    quantize.add_argument("--out", required=True, help="folder to write the quantised checkpoint to")
    quantize.add_argument("--bits", type=int, choices=(8, 4), required=True)
    quantize.set_defaults(run=_quantize)

    info = commands.add_parser("info", help="architecture, sizes and memory of a checkpoint")
    _model_options(info)
    info.set_defaults(run=_info)
    return parser


def _model_options(p):
    p.add_argument("--model", default=DEFAULT_MODEL,
                   help=f"checkpoint folder or hub id (default {DEFAULT_MODEL})")
    p.add_argument("--context", type=int, default=None,
                   help="context window in tokens (default: the model's)")
    p.add_argument("--quantize", choices=("int8", "int4"), default=None,
                   help="quantise the weights as they load (weight-only, blocks of 32)")
    p.add_argument("--kv-cache", choices=("fp32", "fp16"), default="fp32",
                   help="keys and values in fp16: half the memory and faster long contexts, less exact")


def _chat_options(p):
    p.add_argument("--system", default=None, help="system message")
    think = p.add_mutually_exclusive_group()
    think.add_argument("--think", dest="think", action="store_true", default=None,
                       help="Qwen3: enable thinking")
    think.add_argument("--no-think", dest="think", action="store_false", help="Qwen3: disable thinking")
    _reasoning_budget_option(p, "")


def _reasoning_budget_option(p, help_end: str):
    p.add_argument("--reasoning-budget", type=int, default=-1, metavar="N",
                   help="thinking tokens before the end of thinking is forced (Qwen's closing sentence, then "
                        f"</think>): -1 no limit (default), 0 none{help_end}")


def _sampling_options(p):
    p.add_argument("--max-new-tokens", type=int, default=None, help="default: until end of turn or context")
    p.add_argument("--temperature", type=float, default=None, help="0 = greedy (default: generation_config)")
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--min-p", type=float, default=None)
    p.add_argument("--repetition-penalty", type=float, default=None,
                   help="divides the logits of tokens in the prompt or the output (transformers' rule)")
    p.add_argument("--frequency-penalty", type=float, default=None,
                   help="subtracted per time a token was generated (OpenAI's rule; not the prompt)")
    p.add_argument("--presence-penalty", type=float, default=None,
                   help="subtracted once from every token generated so far (OpenAI's rule)")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--stop", action="append", default=None,
                   help="stop string (repeatable); the text ends before it")
    constraint = p.add_mutually_exclusive_group()
    constraint.add_argument("--json-schema", default=None, metavar="JSON|@FILE",
                            help="the answer is a JSON document valid under this schema (every turn of a "
                                 "chat); '{\"type\": \"object\"}' for any JSON object")
    constraint.add_argument("--grammar-file", default=None, metavar="FILE",
                            help="the answer follows this grammar (GBNF as llama.cpp writes it, or Lark)")
    constraint.add_argument("--regex", default=None, help="the answer matches this regular expression")


def _speculative_options(p):
    p.add_argument("--speculative", default=None, metavar="ngram|mtp|model:PATH",
                   help="draft tokens and verify them in one pass (the same output, faster where drafts are "
                        "right): prompt lookup, the checkpoint's MTP head, or a smaller model with the same "
                        "tokenizer")
    p.add_argument("--speculative-tokens", type=int, default=DRAFT_TOKENS,
                   help=f"the most tokens drafted a step (default {DRAFT_TOKENS}; fewer while drafts miss)")


def _drafter(args, model):
    """A new drafter for one sequence (Model.drafter), or None."""
    return model.drafter(args.speculative) if args.speculative else None


def _load(args):
    return load(args.model, context_length=args.context, quantize=args.quantize, kv_cache=args.kv_cache)


def _options(args, model) -> GenerationOptions:
    """The sampling options given on the command line; the others from generation_config.json."""
    given = {f.name: getattr(args, f.name, None) for f in fields(GenerationOptions)}
    given["json_schema"] = _text_or_file(args.json_schema, "--json-schema")
    if args.grammar_file is not None:
        given["grammar"] = _text_or_file("@" + args.grammar_file, "--grammar-file")
    return options_with_defaults(given, model.generation_config)


def _text_or_file(value: str | None, option: str) -> str | None:
    """`value`, or the text of the file it names as @FILE."""
    if value is None or not value.startswith("@"):
        return value
    try:
        return Path(value[1:]).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        reason = e.strerror if isinstance(e, OSError) else e
        raise ConstraintError(f"{option}: cannot read {value[1:]} ({reason})") from None


def _template_kwargs(args) -> dict:
    return {} if args.think is None else {"enable_thinking": args.think}


def _messages(args, user: str) -> list[dict]:
    system = [{"role": "system", "content": args.system}] if args.system else []
    return system + [{"role": "user", "content": user}]


def _generate(args) -> int:
    model = _load(args)
    tok = _require_tokenizer(model)
    chat = not args.no_chat and tok.has_chat_template
    if chat:
        prompt = tok.apply_chat_template(_messages(args, args.prompt), add_generation_prompt=True,
                                         **_template_kwargs(args))
    else:
        if args.system or args.think is not None or args.reasoning_budget != -1:
            raise TemplateError("--system/--think/--reasoning-budget need the chat template (drop --no-chat)")
        prompt = tok.encode(args.prompt)
    stats, options = Stats(), _options(args, model)
    constraint = Constraint.of(options, tok, model.config.vocab_size, model.eos_token_ids, chat)
    _stream_to_stdout(model, model.sequence(), _drafter(args, model), prompt, args, stats, chat, options,
                      constraint)
    print(stats.line(), file=sys.stderr)
    return 0


def _stream_to_stdout(model, sequence, drafter, prompt, args, stats, chat: bool, options: GenerationOptions,
                      constraint: Constraint | None) -> Delta:
    """Generate, printing the reply as it comes (Printer); returns it whole. Its text ends before a stop
    string (as the OpenAI API's does). A `chat` prompt (the chat template's) has its reasoning told from
    its content by the markers' token ids (Reply); a raw prompt's reply is all content. A constraint
    (text/constraints.py) holds the reply to a schema, a grammar or a regex."""
    # By default until the end of turn or of the context window (a prompt that fills the window is
    # refused by the sequence: it leaves no room for the one token asked for).
    max_new = (args.max_new_tokens if args.max_new_tokens is not None
               else max(1, model.context_length - len(prompt)))
    reply = Reply(model.tokenizer, prompt, options.stop, chat=chat, reasoning_budget=options.reasoning_budget)
    printer = Printer(sys.stdout)
    for _, delta in stream_tokens(sequence, prompt, max_new, options, model.eos_token_ids, reply, stats,
                                  drafter, args.speculative_tokens, constraint):
        printer.show(delta)
    printer.show(reply.finish())
    printer.end()
    return printer.reply


class Printer:
    """A reply's deltas on `out` as they come: its reasoning between "<think>" and "</think>" lines, dimmed
    on a terminal, then its content; `reply` gathers them. (Each delta holds one of the two: Reply adds
    the text before a marker to the delta of the marker's token.)"""

    def __init__(self, out):
        self.out = out
        self.dim, self.reset = (DIM, RESET) if out.isatty() else ("", "")
        self.thinking = False  # "<think>" shown, "</think>" not yet
        self.reply = Delta()

    def show(self, delta: Delta):
        if delta.reasoning and not self.thinking:
            self.out.write(self.dim + "<think>\n")
            self.thinking = True
        elif delta.content and self.thinking:
            self.out.write("\n</think>" + self.reset + "\n\n")
            self.thinking = False
        self.out.write(delta.reasoning + delta.content)
        self.out.flush()
        self.reply.reasoning += delta.reasoning
        self.reply.content += delta.content

    def end(self):
        """Close reasoning cut short (by the token limit or a stop string), and the line."""
        self.out.write(("\n</think>" + self.reset if self.thinking else "") + "\n")
        self.out.flush()


def _chat(args) -> int:
    model = _load(args)
    tok = _require_tokenizer(model)
    if not tok.has_chat_template:
        raise TemplateError("this checkpoint has no chat template; use `generate --no-chat`")
    sequence, drafter, messages = model.sequence(), _drafter(args, model), []
    options = _options(args, model)  # the same for every turn, and checked before the first
    constraint = Constraint.of(options, tok, model.config.vocab_size, model.eos_token_ids)
    if args.system:
        messages.append({"role": "system", "content": args.system})
    print("minqwen chat — /reset clears the conversation, /exit quits", file=sys.stderr)
    while True:
        try:
            user = input("> ")
        except EOFError:
            print()
            return 0
        if user.strip() == "/exit":
            return 0
        if user.strip() == "/reset":
            sequence, drafter = model.sequence(), _drafter(args, model)
            messages = messages[:1] if args.system else []
            print("(conversation cleared)", file=sys.stderr)
            continue
        messages.append({"role": "user", "content": user})
        prompt = tok.apply_chat_template(messages, add_generation_prompt=True, **_template_kwargs(args))
        stats = Stats()
        reply = _stream_to_stdout(model, sequence, drafter, prompt, args, stats, True, options, constraint)
        # no reasoning: None, which the template does not see (Tokenizer.apply_chat_template drops it)
        messages.append({"role": "assistant", "content": reply.content.strip(),
                         "reasoning_content": reply.reasoning or None})
        print(stats.line(), file=sys.stderr)


def _serve(args) -> int:
    from .serve.http_server import serve  # the HTTP server loads only for this command

    budget = GenerationOptions(reasoning_budget=args.reasoning_budget).reasoning_budget  # checked
    model = _load(args)
    serve(model, args.host, args.port, args.parallel, args.queue,
          args.api_key or os.environ.get("MINQWEN_API_KEY"), args.model_name, args.speculative,
          args.speculative_tokens, budget)
    return 0


def _require_tokenizer(model):
    if model.tokenizer is None:
        raise CheckpointError(f"{model.path}: no tokenizer.json in the checkpoint folder")
    return model.tokenizer


def _quantize(args) -> int:
    write_quantized_checkpoint(resolve(args.model), args.out, args.bits)
    print(f"wrote {args.out}", file=sys.stderr)
    return 0


def _info(args) -> int:
    checkpoint = open_checkpoint(args.model)
    config = checkpoint.config
    src = TensorSource(checkpoint.tensors, fp8_block_rows=config.fp8_block_rows)
    weights = load_weights(config, src)  # checks every tensor the model reads (maps them; reads no weights)
    by_kind: dict[str, list] = {}
    for name in src.read:
        by_kind.setdefault(_stored_kind(src.tensors[name], config), []).append(src.tensors[name])
    kinds = ", ".join(f"{kind} {len(ts)} ({sum(t.nbytes for t in ts) / 2**30:.2f} GiB)"
                      for kind, ts in sorted(by_kind.items()))
    loaded = [t for ts in by_kind.values() for t in ts]
    context = args.context or config.context_window
    kv_bytes = 2 if args.kv_cache == "fp16" else 4
    kv_per_token = 2 * len(config.attention_layers) * config.num_key_value_heads * config.head_dim * kv_bytes
    lines = [
        ("checkpoint", f"{checkpoint.path} ({checkpoint.file_format})"),
        ("architecture", config.model_type + (" (image-text checkpoint read as a text model)"
                                              if config.has_vision_tower else "")),
        ("layers", f"{config.num_hidden_layers} "
                   f"({', '.join(f'{n} {t}' for t, n in _counts(config.layer_types))})"),
        ("hidden / intermediate", f"{config.hidden_size} / {config.intermediate_size}"),
        ("heads", f"{config.num_attention_heads} query, {config.num_key_value_heads} key/value, "
                  f"head_dim {config.head_dim}"),
        *([("linear attention heads", f"{config.linear_num_key_heads} key, {config.linear_num_value_heads} "
                                      f"value, in {config.linear_value_head_order} order")]
          if config.deltanet_layers else []),
        ("vocabulary", str(config.vocab_size)),
        ("context", f"{config.context_window} "
                    f"(RoPE {config.rope.rope_type}, theta {config.rope.rope_theta:g})"),
        ("parameters", f"{sum(int(np.prod(t.shape)) for t in loaded) / 1e6:.1f} M"
                       + (f"; FP8 blocks of {config.fp8_block_rows} x 128" if config.fp8_block_rows else "")),
        ("tensors by type", kinds),
        ("RAM for weights", f"{sum(t.nbytes for t in loaded) / 2**30:.2f} GiB, memory-mapped"),
        ("KV cache", f"{kv_per_token / 1024:.1f} KiB/token {args.kv_cache}; "
                     f"{kv_per_token * context / 2**30:.2f} GiB at {context} tokens"),
        ("kernels", f"{isa.ISA} path "
                    f"(MINQWEN_ISA chooses among {', '.join(isa.usable_paths(isa.FEATURES))})"
                    + "; MINQWEN_PREFILL=bf16 on AMX tiles" * isa.AMX),
    ]
    if config.num_experts:
        lines.insert(5, ("experts", f"{config.num_experts}, top-{config.num_experts_per_tok}, "
                                    f"moe_intermediate {config.moe_intermediate_size}, stored "
                                    f"{' and '.join(sorted(src.expert_layouts))}"))
    if weights.mtp:
        mtp = [src.tensors[name] for name in src.read if name.startswith("mtp.")]
        lines.append(("MTP head", f"{len(weights.mtp.layers)} full-attention layer, {len(mtp)} tensors "
                                  f"({sum(t.nbytes for t in mtp) / 2**30:.2f} GiB): for --speculative mtp"))
    else:
        lines.append(("MTP head", "none"))
    for kind, names in unread_tensors(src).items():
        size = sum(src.tensors[name].nbytes for name in names) / 2**30
        if kind in IGNORED.values():
            lines.append(("not loaded", f"{kind}: {len(names)} tensors, {size:.2f} GiB"))
        else:  # a layout minqwen does not know: say so, never drop it silently
            shown = ", ".join(names[:3]) + (", ..." if len(names) > 3 else "")
            lines.append(("unexpected tensors", f"{len(names)} ({size:.2f} GiB), not loaded: {shown}"))
    for key, value in lines:
        print(f"{key:>22}: {value}")
    return 0


def _stored_kind(t, config) -> str:
    if isinstance(t, GgmlMatrix):
        return GGML_TYPES[t.ggml_type].name.lower()
    return "f8_e4m3" if config.fp8_block_rows and t.dtype == np.uint8 else STORED_NAMES[t.dtype].lower()


def _counts(items):
    seen = {}
    for item in items:
        seen[item] = seen.get(item, 0) + 1
    return seen.items()
