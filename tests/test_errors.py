"""Bad input: a typed exception from the API, one line and exit status 2 from the CLI, never a traceback."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

import minqwen
from checkpoints import build_checkpoint
from minqwen.errors import (
    CheckpointError,
    ConfigError,
    ContextLengthError,
    SamplingError,
    TokenError,
    UnsupportedModelError,
)

CONFIG = dict(model_type="qwen2", architectures=["Qwen2ForCausalLM"], vocab_size=128, hidden_size=32,
              intermediate_size=48, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
              max_position_embeddings=64, rope_theta=10000.0)


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    return build_checkpoint(tmp_path_factory.mktemp("good"), CONFIG)


@pytest.fixture
def broken(good, tmp_path):
    """A fresh copy of the good checkpoint, for a test to damage."""
    return shutil.copytree(good, tmp_path / "ckpt")


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "minqwen", *args], capture_output=True, text=True,
                          timeout=300)


def assert_one_line_error(result, fragment: str):
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and fragment in lines[0], result.stderr


def test_missing_folder(tmp_path):
    with pytest.raises(CheckpointError, match="no such checkpoint folder"):
        minqwen.load(tmp_path / "nope")
    assert_one_line_error(run_cli("info", "--model", str(tmp_path / "nope")), "no such checkpoint folder")


def test_config_not_json(broken):
    (broken / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        minqwen.load(broken)


def test_missing_config(broken):
    (broken / "config.json").unlink()
    with pytest.raises(ConfigError, match="config.json: file not found"):
        minqwen.load(broken)


def test_unsupported_model_type(broken):
    (broken / "config.json").write_text(json.dumps(dict(CONFIG, model_type="mistral")))
    with pytest.raises(UnsupportedModelError, match="mistral"):
        minqwen.load(broken)
    assert_one_line_error(run_cli("info", "--model", str(broken)), "unsupported model_type 'mistral'")


def test_config_disagrees_with_tensors(broken):
    (broken / "config.json").write_text(json.dumps(dict(CONFIG, intermediate_size=50)))
    with pytest.raises(ConfigError,
                       match=r"mlp.gate_proj.weight has shape \(48, 32\); the config implies \(50, 32\)"):
        minqwen.load(broken)


def test_missing_tensor(broken):
    (broken / "config.json").write_text(json.dumps(dict(CONFIG, num_hidden_layers=2)))
    with pytest.raises(ConfigError, match="no tensor model.layers.1"):
        minqwen.load(broken)


def test_truncated_safetensors(broken):
    path = broken / "model.safetensors"
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(CheckpointError):
        minqwen.load(broken)
    result = run_cli("generate", "--model", str(broken), "--prompt", "hi")
    assert_one_line_error(result, "model.safetensors")


def test_no_safetensors(broken):
    (broken / "model.safetensors").unlink()
    with pytest.raises(CheckpointError):
        minqwen.load(broken)


def test_prompt_longer_than_context(good):
    model = minqwen.load(good)
    with pytest.raises(ContextLengthError):
        model.logits([1] * 65)
    with pytest.raises(ContextLengthError):
        model.generate([1] * 60, max_new_tokens=10)
    with pytest.raises(ContextLengthError):
        minqwen.load(good, context_length=65)
    assert len(model.generate([1] * 54, max_new_tokens=10)) == 10  # exactly fills the window


def test_unknown_load_options(good):
    with pytest.raises(ConfigError, match="kv_cache must be one of fp32, fp16, got 'int8'"):
        minqwen.load(good, kv_cache="int8")
    with pytest.raises(ConfigError, match="quantize must be one of int8, int4, got 'int2'"):
        minqwen.load(good, quantize="int2")


def test_token_ids_outside_vocabulary(good):
    model = minqwen.load(good)
    for bad in ([128], [-1], [3, 500]):
        with pytest.raises(TokenError):
            model.logits(bad)
        with pytest.raises(TokenError):
            model.generate(bad, max_new_tokens=2)
    with pytest.raises(TokenError):
        model.logits([])


@pytest.mark.parametrize("options", [dict(temperature=-0.1), dict(temperature=float("nan")), dict(top_p=0.0),
                                     dict(top_p=1.5), dict(top_k=-1), dict(top_k=2.5), dict(min_p=1.5),
                                     dict(repetition_penalty=0.0), dict(seed=-3), dict(stop=[""])])
def test_invalid_sampling_values(good, options):
    model = minqwen.load(good)
    with pytest.raises(SamplingError):
        model.generate([1, 2], max_new_tokens=4, **options)
    with pytest.raises(SamplingError):
        model.stream([1, 2], max_new_tokens=4, **options)  # raises at the call, not at the first token


def test_negative_max_new_tokens(good):
    with pytest.raises(SamplingError):
        minqwen.load(good).generate([1], max_new_tokens=-1)



# A compile target without AVX-512 (so without the avx512 path), whatever CPU runs the tests.
AVX2_TARGET = {"NUMBA_CPU_FEATURES": "+sse4.2,+popcnt,+avx,+avx2,+fma,+f16c,-avx512f"}
UNUSABLE_PATHS = {
    "no path": ({"MINQWEN_ISA": "sse9"}, "MINQWEN_ISA='sse9' is not a path (paths this CPU runs: generic"),
    "a path the CPU lacks": ({"MINQWEN_ISA": "avx512", **AVX2_TARGET},
                             "MINQWEN_ISA=avx512 needs avx512bw, avx512f, avx512vl, avx512vnni, which this "
                             "CPU (as Numba targets it) lacks (paths this CPU runs: generic, avx2)"),
    "no prefill": ({"MINQWEN_PREFILL": "int4"},
                   "MINQWEN_PREFILL='int4' is not a prefill this CPU runs (float"),
    "a prefill the path lacks": ({"MINQWEN_PREFILL": "bf16", **AVX2_TARGET},  # bf16 needs AVX512-BF16
                                 "MINQWEN_PREFILL='bf16' is not a prefill this CPU runs (float, int16)"),
    "a decode the path lacks": ({"MINQWEN_DECODE": "int8", **AVX2_TARGET},  # int8 needs 256-bit VNNI
                                "MINQWEN_DECODE='int8' is not a decode this CPU runs (int16)"),
}
LOAD = """
import sys, minqwen
try:
    minqwen.load(sys.argv[1])
except minqwen.ConfigError as e:
    print(e)
"""


@pytest.mark.parametrize("case", UNUSABLE_PATHS)
def test_an_instruction_path_the_cpu_cannot_run_is_refused_where_it_is_chosen(good, case):
    """MINQWEN_ISA naming no path, or one the CPU (as Numba targets it) lacks, or MINQWEN_PREFILL /
    MINQWEN_DECODE naming a prefill / decode the path has not (kernels/isa.py), fails the import of the
    kernels with the paths it could run (benches and direct kernel users never run another path without a
    word); minqwen.load raises it as a ConfigError; `info` and `generate` print it as one line."""
    env, problem = UNUSABLE_PATHS[case]
    env = {**os.environ, **env}

    def run(*args):
        return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=300, env=env)

    kernels = run("-c", "import minqwen.kernels.linear")
    assert kernels.returncode == 1, kernels.stderr
    last_line = kernels.stderr.strip().splitlines()[-1]
    assert last_line.startswith(f"minqwen.kernels.InstructionPathError: {problem}"), kernels.stderr
    api = run("-c", LOAD, str(good))
    assert api.returncode == 0 and api.stdout.startswith(problem), api.stderr
    for command in (["info"], ["generate", "--prompt", "Hi", "--max-new-tokens", "2"]):
        assert_one_line_error(run("-m", "minqwen", *command, "--model", str(good)), problem)
