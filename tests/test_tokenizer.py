import torch

import blt
from blt.tokenizer import BOS_ID, EOS_ID, StreamDecoder, decode, encode, encode_batch, ids_to_bytes


def test_encode_offsets_bytes_and_prepends_bos():
    assert encode("Hé").tolist() == [BOS_ID, ord("H") + 4, 0xC3 + 4, 0xA9 + 4]
    assert encode(b"\x00\xff", bos=False, eos=True).tolist() == [4, 259, EOS_ID]
    assert encode("").tolist() == [BOS_ID]


def test_decode_never_raises():
    assert decode(encode("naïve 🙂")) == "naïve 🙂"
    assert decode([1, 0, 2, 3, 4 + 0xFF, 4 + ord("a")]) == "\ufffda"  # specials dropped, bad byte replaced
    assert ids_to_bytes(torch.tensor([1, 4 + 0xC3])) == b"\xc3"


def test_stream_decoder_holds_back_incomplete_characters():
    data = "a🙂é".encode()
    dec = StreamDecoder()
    out = [dec.feed(data[i : i + 1]) for i in range(len(data))]
    assert out == ["a", "", "", "", "🙂", "", "é"]
    dec.feed(b"\xf0\x9f")
    assert dec.flush() == "\ufffd"
    assert StreamDecoder().feed(encode("ok"), ids=True) == "ok"


def test_encode_batch_pads_right():
    ids, lengths = encode_batch(["ab", "abcd"])
    assert lengths.tolist() == [3, 5]
    assert ids.tolist() == [[1, 101, 102, 0, 0], [1, 101, 102, 103, 104]]
    assert blt.VOCAB_SIZE == 260
