import pytest
import torch

from blt.model.hash_embeddings import HASH_PRIMES, HashNgramEmbedding, ngram_hash


def reference_hash(ids, t, n, prime, modulo):
    """The release's hash written out in plain Python: int64 wraparound, oldest byte times prime^0."""
    window = ([0] * (n - 1) + ids)[t : t + n]
    total = sum(x * pow(prime, j, 2**64) for j, x in enumerate(window)) % 2**64
    if total >= 2**63:
        total -= 2**64  # back to a signed int64
    return total % modulo


@pytest.mark.parametrize("n", [1, 3, 8])
@pytest.mark.parametrize("f", [0, 1, 10])
def test_hash_matches_the_release_formula(n, f):
    ids = [1, 77, 259, 4, 120, 36, 200, 255, 9, 101, 13]
    got = ngram_hash(torch.tensor([ids]), n, HASH_PRIMES[f], 500002)[0].tolist()
    assert got == [reference_hash(ids, t, n, HASH_PRIMES[f], 500002) for t in range(len(ids))]


def test_known_values():
    # 77 + 120 * 1000000007 = 120000000917 -> mod 30000 = 917; a first position sees [0, 77]
    assert ngram_hash(torch.tensor([[77, 120]]), 2, 1000000007, 30000).tolist() == [[(77 * 1000000007) % 30000, 917]]


def test_wraparound_is_exercised():
    # with n=8 the powers of the prime overflow int64: the result must still be the signed-wrap value
    ids = [259] * 8
    assert ngram_hash(torch.tensor([ids]), 8, HASH_PRIMES[0], 97)[0, -1] == reference_hash(
        ids, 7, 8, HASH_PRIMES[0], 97
    )


def test_prefix_continues_a_sequence():
    ids = torch.tensor([[1, 50, 60, 70, 80, 90]])
    full = ngram_hash(ids, 4, HASH_PRIMES[0], 1000)
    assert torch.equal(ngram_hash(ids[:, 3:], 4, HASH_PRIMES[0], 1000, prefix=ids[:, :3]), full[:, 3:])


def test_matches_transformers():
    modeling = pytest.importorskip("transformers.models.blt.modeling_blt")
    ids = torch.randint(0, 260, (3, 50), generator=torch.Generator().manual_seed(0))
    for f, prime in enumerate(HASH_PRIMES[:3]):
        for n in (3, 5, 8):
            assert torch.equal(
                ngram_hash(ids, n, prime, 500002), modeling.byte_group_hash_function(ids, n, prime, 500002)
            )


def test_one_table_per_function_and_n_summed():
    emb = HashNgramEmbedding(8, (3, 4), table_size=11, n_functions=2)
    assert len(emb.tables) == 4
    ids = torch.tensor([[1, 40, 41, 42]])
    expected = sum(
        emb.tables[f * 2 + j](ngram_hash(ids, n, HASH_PRIMES[f], 11)) for f in range(2) for j, n in enumerate((3, 4))
    )
    assert torch.equal(emb(ids), expected)
