"""The kernel and autotune caches under faults: invalid tuned configs, strict mode, FIFOs and
symlinks where cache files should be, an unwritable or overlong cache path, stale temporary files."""
from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
import warnings
from pathlib import Path

import pytest
import torch

import compiler
from runtime import autotune
from runtime.autotune import Autotuner, TuningKey, config_problem, device_label, shape_bucket
from runtime.cache import STALE_TEMP_S, CacheMissError, SourceCache, source_hash
from tests.compiler.test_attention_pass import Sdpa, qkv

SOURCE = "VALUE = 42\n"
ATTENTION_DEFAULT = {"BLOCK_M": 64, "BLOCK_N": 32, "num_warps": 4, "num_stages": 2}
KEY = TuningKey(kernel="attention_d16", source_hash="abc", bucket=(64, 64), dtype="float32",
                device="cpu-interpreter")


def finishes(function, seconds: float = 20):
    """function()'s result, failing the test if it is still running after `seconds` (a hang)."""
    outcome = {}

    def target():
        try:
            outcome["value"] = function()
        except BaseException as error:  # re-raised in the test's thread
            outcome["error"] = error

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), f"still blocked after {seconds} s"
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]


def causes(error: BaseException) -> list[BaseException]:
    """`error` and every exception it was raised from or while handling."""
    chain = []
    while error is not None and error not in chain:
        chain.append(error)
        error = error.__cause__ or error.__context__ or getattr(error, "inner_exception", None)
    return chain


def attention_key(kernel, q: torch.Tensor, k: torch.Tensor) -> TuningKey:
    """The TuningKey the attention op uses for `kernel` at these shapes."""
    return TuningKey(kernel=kernel.name, source_hash=source_hash(kernel.source),
                     bucket=(shape_bucket(q.shape[-2]), shape_bucket(k.shape[-2])),
                     dtype=str(q.dtype).removeprefix("torch."), device=device_label(q.device))


def compile_and_run(q, k, v):
    torch._dynamo.reset()
    compiled = compiler.compile(Sdpa())
    with torch.no_grad():
        return compiled, compiled(q, k, v)


# -- item 4: a tuned config is validated against its template before it is trusted ----------------

@pytest.mark.parametrize("config", [
    ATTENTION_DEFAULT | {"BOGUS": 1},
    {"BLOCK_M": 64, "num_warps": 4, "num_stages": 2},
    ATTENTION_DEFAULT | {"BLOCK_M": 48},
    ATTENTION_DEFAULT | {"BLOCK_N": 0},
    ATTENTION_DEFAULT | {"num_warps": "4"},
    ATTENTION_DEFAULT | {"num_stages": True},
])
def test_invalid_tuned_config_with_a_valid_checksum_falls_back_to_the_default(tmp_path, config):
    Autotuner(tmp_path).store(KEY, config, {})
    default = ATTENTION_DEFAULT | {"BLOCK_N": 64}
    with pytest.warns(UserWarning, match="invalid for its template"):
        chosen = Autotuner(tmp_path).config_for(KEY, default, [], run=None, mode="default")
    assert chosen == default


def test_valid_tuned_config_is_used(tmp_path):
    tuned = ATTENTION_DEFAULT | {"BLOCK_M": 128}
    Autotuner(tmp_path).store(KEY, tuned, {})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert Autotuner(tmp_path).config_for(KEY, ATTENTION_DEFAULT, [], run=None, mode="default") == tuned


def test_every_family_declares_the_keys_of_its_configs():
    """Each family's default config and every autotuning candidate pass the validation."""
    from codegen import attention, attention_decode, long_conv, short_conv, sparse_mlp, ssd_scan_backward, ssm_scan

    prefill, decode = attention.AttentionSpec(64, 64), attention_decode.DecodeSpec(64, 64)
    scan, step = ssm_scan.ScanSpec(), ssm_scan.StateUpdateSpec()
    ssd_sizes = dict(seqlen=2048, heads=24, groups=1, headdim=64, dstate=128)
    configs = {
        "attention_d64": [attention.default_config(prefill, 128, 128), *attention.config_space(prefill)],
        "attention_decode_d64": [attention_decode.default_config(decode, 1, 512, group=4, kv_rows=2),
                                 *attention_decode.config_space(decode, 1, 512, group=4, kv_rows=2, sm_count=132)],
        "long_conv": [long_conv.default_config(long_conv.fft_plan(8192)),
                      *long_conv.config_space(long_conv.fft_plan(8192))],
        "short_conv_k4": [short_conv.default_config(torch.empty(2, 8, 64)), *short_conv.config_space()],
        "sparse_mlp_relu": [sparse_mlp.default_config(4, 64, 32, sm_count=132),
                            *sparse_mlp.config_space(4, 64, 32, sm_count=132),
                            *sparse_mlp.config_space(64, 4096, 1024, sm_count=132)],
        "ssm_scan": [ssm_scan.default_config(scan, batch=1, dim=16, groups=1, dstate=16, seqlen=64),
                     *ssm_scan.config_space(scan, 16)],
        "ssm_state_update": [ssm_scan.default_config(step, batch=1, dim=16, groups=1, dstate=16),
                             *ssm_scan.config_space(step, 16)],
        "ssd_scan_backward_D": [ssd_scan_backward.backward_default_config(batch=1, **ssd_sizes),
                                *ssd_scan_backward.backward_config_space(**ssd_sizes)],
    }
    for kernel, family_configs in configs.items():
        assert autotune.family_config_keys(kernel) is not None, kernel
        assert [config_problem(kernel, config) for config in family_configs] == [None] * len(family_configs), kernel
        assert config_problem(kernel, family_configs[0] | {"EXTRA": 1}) is not None, kernel


def test_compiled_model_survives_an_invalid_tuned_config(tmp_path, monkeypatch):
    monkeypatch.setenv("FLASHFX_CACHE_DIR", str(tmp_path))
    q, k, v = qkv(1, 2, 24, 24, 16)
    compiled, _ = compile_and_run(q, k, v)
    (kernel,) = compiled.kernels
    Autotuner(tmp_path).store(attention_key(kernel, q, k), ATTENTION_DEFAULT | {"BLOCK_M": 48}, {})
    with pytest.warns(UserWarning, match="invalid for its template"):
        compiled, ours = compile_and_run(q, k, v)
    assert compiled.patterns == ["attention"]
    torch.testing.assert_close(ours, Sdpa()(q, k, v), atol=1e-5, rtol=1e-5)


# -- item 5: FLASHFX_STRICT_CACHE=1 turns every miss into an error naming kernel and bucket --------

def test_strict_mode_missing_tuned_config_is_an_error_in_default_mode(tmp_path, monkeypatch):
    monkeypatch.setenv("FLASHFX_STRICT_CACHE", "1")
    with pytest.raises(CacheMissError, match=r"attention_d16.*\(64, 64\)"):
        Autotuner(tmp_path).config_for(KEY, ATTENTION_DEFAULT, [], run=None, mode="default")


def test_strict_mode_missing_kernel_is_an_error_not_an_unfused_run(tmp_path, monkeypatch):
    monkeypatch.setenv("FLASHFX_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("FLASHFX_STRICT_CACHE", "1")
    with pytest.raises(Exception) as raised:
        compile_and_run(*qkv(1, 2, 24, 24, 16))
    (miss,) = [error for error in causes(raised.value) if isinstance(error, CacheMissError)]
    assert "attention_d16" in str(miss)


def test_strict_mode_runs_from_a_warmed_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("FLASHFX_CACHE_DIR", str(tmp_path))
    q, k, v = qkv(1, 2, 24, 24, 16)
    compiled, _ = compile_and_run(q, k, v)
    (kernel,) = compiled.kernels
    Autotuner(tmp_path).store(attention_key(kernel, q, k), kernel.config, {})
    monkeypatch.setenv("FLASHFX_STRICT_CACHE", "1")
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="flashfx")
        compiled, ours = compile_and_run(q, k, v)
    assert compiled.patterns == ["attention"]
    torch.testing.assert_close(ours, Sdpa()(q, k, v), atol=1e-5, rtol=1e-5)


# -- item 10: only regular files are read, without following links, up to a size limit ------------

def test_fifo_where_a_kernel_should_be_does_not_block(tmp_path):
    cache = SourceCache(tmp_path)
    path = cache.path_for("demo", SOURCE)
    path.parent.mkdir(parents=True)
    os.mkfifo(path)
    with pytest.warns(UserWarning, match="not a regular file"):
        assert finishes(lambda: cache.store("demo", SOURCE)) == path
    assert path.is_file() and path.read_text() == SOURCE


@pytest.mark.parametrize("target", ["regular", "/dev/zero"])
def test_symlinked_kernel_is_not_followed(tmp_path, target):
    cache = SourceCache(tmp_path / "cache")
    path = cache.path_for("demo", SOURCE)
    path.parent.mkdir(parents=True)
    if target == "regular":
        target = tmp_path / "elsewhere.py"
        target.write_text(SOURCE)
    path.symlink_to(target)
    with pytest.warns(UserWarning, match="symbolic link"):
        assert finishes(lambda: cache.store("demo", SOURCE)) == path
    assert not path.is_symlink() and path.read_text() == SOURCE


def test_oversized_kernel_file_is_not_read_whole(tmp_path, monkeypatch):
    monkeypatch.setattr("runtime.cache.MAX_FILE_BYTES", 64)
    cache = SourceCache(tmp_path)
    path = cache.path_for("demo", SOURCE)
    path.parent.mkdir(parents=True)
    path.write_text(SOURCE + "#" * 100)
    with pytest.warns(UserWarning, match="larger than"):
        cache.store("demo", SOURCE)
    assert path.read_text() == SOURCE


@pytest.mark.parametrize("kind", ["fifo", "symlink"])
def test_fifo_or_symlink_where_a_tuned_config_should_be(tmp_path, kind):
    tuner = Autotuner(tmp_path)
    path = tuner.path_for(KEY)
    path.parent.mkdir(parents=True)
    if kind == "fifo":
        os.mkfifo(path)
    else:
        path.symlink_to("/dev/zero")
    with pytest.warns(UserWarning, match=f"{'not a regular file' if kind == 'fifo' else 'symbolic link'}"):
        config = finishes(lambda: tuner.config_for(KEY, ATTENTION_DEFAULT, [], run=None, mode="default"))
    assert config == ATTENTION_DEFAULT


def test_export_skips_a_fifo_in_the_cache(tmp_path):
    from runtime.bundle import export_cache

    SourceCache(tmp_path / "cache").store("demo", SOURCE)
    os.mkfifo(tmp_path / "cache" / "kernels" / "fifo-0123456789abcdef.py")
    with pytest.warns(UserWarning, match="not a regular file"):
        assert finishes(lambda: export_cache(tmp_path / "cache.zip", tmp_path / "cache")) == 1


# -- item 11: one fallback directory per process, removed at exit ----------------------------------

def unwritable_root(tmp_path: Path) -> Path:
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("")
    return blocker / "cache"


def test_unwritable_cache_falls_back_once_per_process(tmp_path):
    root = unwritable_root(tmp_path)
    with pytest.warns(UserWarning, match="not writable") as record:
        paths = [SourceCache(root).store(name, source)
                 for name, source in [("a", SOURCE), ("b", "B = 1\n"), ("a", SOURCE), ("c", "C = 1\n")]]
    assert len(record) == 1
    assert paths[0] == paths[2] and len({path.parent for path in paths}) == 1
    assert all(path.read_text() == source for path, source in zip(paths, [SOURCE, "B = 1\n", SOURCE, "C = 1\n"]))


def test_cache_path_longer_than_the_os_allows_falls_back(tmp_path):
    root = tmp_path / ("x" * 300) / "cache"
    with pytest.warns(UserWarning, match="not writable"):
        path = SourceCache(root).store("demo", SOURCE)
    assert path.read_text() == SOURCE


def test_fallback_directory_is_removed_at_exit(tmp_path):
    script = ("import warnings; warnings.simplefilter('ignore'); from runtime.cache import SourceCache; "
              f"print(SourceCache({str(unwritable_root(tmp_path))!r}).store('demo', 'X = 1\\n'))")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                            cwd=Path(__file__).parents[2], check=True)
    fallback = Path(result.stdout.strip())
    assert fallback.name.startswith("demo-") and not fallback.exists() and not fallback.parent.parent.exists()


def test_unwritable_cache_lists_each_kernel_once(tmp_path, monkeypatch):
    from models.gpt import tiny_sdpa_gqa

    monkeypatch.setenv("FLASHFX_CACHE_DIR", str(unwritable_root(tmp_path)))
    model, args = tiny_sdpa_gqa(batch=1, length=16)
    with pytest.warns(UserWarning, match="not writable"):
        compiled = compiler.warmup(model, [args], mode="default", progress=False)
    assert len(compiled.patterns) >= 2 and compiled.patterns == ["attention"] * len(compiled.patterns)
    assert len(compiled.kernels) == len({kernel.name for kernel in compiled.kernels})


# -- item 13: stale temporary files, and what the warning says it does -----------------------------

def test_stale_temporary_files_are_removed(tmp_path):
    kernels = tmp_path / "kernels"
    kernels.mkdir()
    stale, fresh = kernels / ".demo-0123456789abcdef.py.dead.tmp", kernels / ".demo-0123456789abcdef.py.live.tmp"
    for temp in (stale, fresh):
        temp.write_text("partial")
    old = time.time() - STALE_TEMP_S - 60
    os.utime(stale, (old, old))
    SourceCache(tmp_path).store("demo", SOURCE)
    assert not stale.exists() and fresh.exists()


def test_damaged_entry_warning_says_what_default_mode_does(tmp_path):
    tuner = Autotuner(tmp_path)
    tuner.store(KEY, ATTENTION_DEFAULT, {})
    tuner.path_for(KEY).write_text("{")
    with pytest.warns(UserWarning) as record:
        assert Autotuner(tmp_path).config_for(KEY, ATTENTION_DEFAULT, [], run=None, mode="default") == ATTENTION_DEFAULT
    (message,) = [str(warning.message) for warning in record]
    assert "rebuild" not in message and "default config" in message
    assert not tuner.path_for(KEY).exists()
