"""Experiments built from the layers below.

compare     FLOP-matched comparison of BLT against BPE and byte baselines
baselines   the BPE token LM and the byte LM
noise       seeded text perturbations
visualize   patch pictures: terminal, HTML, PNG; loss curves
demo        `blt demo`: the whole job on an embedded corpus
"""
