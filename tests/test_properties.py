"""Property-based checks (hypothesis) of the validation layer: any config it accepts builds a model whose forward
runs; anything it rejects is rejected with a BltError before a parameter is allocated; generation arguments are
accepted exactly when they are usable."""

import math

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import blt
from blt.config import BLTConfig, PatchingConfig
from blt.errors import BltError
from blt.inference.sampling import StopChecker, check_generation_args
from blt.memory import blt_params

SETTINGS = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# small integers (and some values no config may hold) for the widths and counts of a tiny BLT
small = st.one_of(st.integers(1, 4).map(lambda n: 8 * n), st.integers(-8, 0), st.just(None), st.just("16"))
heads = st.one_of(st.sampled_from([1, 2, 4]), st.integers(-2, 0), st.just(3), st.just(2.0))
window = st.one_of(st.none(), st.integers(1, 32), st.integers(-4, 0))
eps = st.one_of(st.floats(1e-8, 1e-3), st.just(0.0), st.just(float("nan")), st.just(-1e-5))


def _config(dim, dim_global, h, h_global, win, norm_eps, k):
    return dict(
        dim_local_encoder=dim,
        dim_local_decoder=dim,
        n_layers_local_encoder=1,
        n_layers_local_decoder=1,
        n_heads_local_encoder=h,
        n_heads_local_decoder=h,
        dim_global=dim_global,
        n_layers_global=1,
        n_heads_global=h_global,
        ffn_dim_local_encoder=32,
        ffn_dim_global=32,
        ffn_dim_local_decoder=32,
        cross_attn_k=k,
        cross_attn_nheads=None,
        local_attention_window_len=win,
        norm_eps=norm_eps,
        encoder_hash_byte_group_size=[3],
        encoder_hash_byte_group_vocab=31,
        max_seqlen=64,
        max_encoder_seq_length=128,
        patching=PatchingConfig(mode="static", patch_size=4),
    )


@SETTINGS
@given(small, small, heads, heads, window, eps, st.integers(-1, 3))
def test_accepted_configs_build_and_run_rejected_ones_allocate_nothing(dim, dim_global, h, h_global, win, e, k):
    fields = _config(dim, dim_global, h, h_global, win, e, k)
    try:
        config = BLTConfig(**fields)
    except BltError as err:
        # rejected while the config is built: no model, hence no parameter, ever exists for it
        assert "\n" not in str(err)
        return
    torch.manual_seed(0)
    model = blt.BLT(config).eval()
    assert blt_params(config) == sum(p.numel() for p in model.parameters())  # the memory estimate's count
    ids = blt.encode(b"hello, properties")[None]
    with torch.no_grad():
        logits = model(ids)
    assert logits.shape == (1, ids.shape[1], config.vocab_size) and torch.isfinite(logits).all()


values = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True),
    st.integers(-3, 300),
    st.none(),
    st.booleans(),
    st.text(max_size=2),
)


@SETTINGS
@given(values, values, values, values)
def test_generation_arguments_accepted_exactly_when_usable(max_new_bytes, temperature, top_k, top_p):
    def usable():
        number = lambda x: isinstance(x, (int, float)) and not isinstance(x, bool)  # noqa: E731
        integer = lambda x: isinstance(x, int) and not isinstance(x, bool)  # noqa: E731
        return (
            integer(max_new_bytes)
            and max_new_bytes > 0
            and number(temperature)
            and math.isfinite(temperature)
            and (temperature == 0 or temperature >= 1e-4)
            and (top_k is None or (integer(top_k) and top_k >= 1))
            and (top_p is None or (number(top_p) and 0 < top_p <= 1))
        )

    try:
        out = check_generation_args(["ab", b"\xff"], max_new_bytes, temperature, top_k, top_p)
    except BltError as err:
        assert not usable() and "\n" not in str(err)
    else:
        assert usable() and out == [b"ab", b"\xff"]


@SETTINGS
@given(st.one_of(st.text(min_size=1, max_size=4), st.binary(min_size=1, max_size=4)), st.binary(max_size=12))
def test_one_stop_string_is_one_stop(stop, text):
    checker = StopChecker(stop)
    want = stop.encode("utf-8", "surrogatepass") if isinstance(stop, str) else stop
    assert checker.stops == [want]
    cut = checker.cut(text + want)
    assert cut is not None and (text + want)[:cut] + want == text + want
