"""`PipelineSplit`, the one map from (layers, pp, pp_rank) to a layer range, agrees with megatron-core's own
layer placement (`get_num_layers_to_build`, `get_transformer_layer_offset`) for even and uneven splits, and the
HF <-> megatron names of `hf_mapping` follow it."""

import pytest

from megatron_rlvr.models.stages import PipelineSplit

SPLITS = [(8, 1, None, None), (8, 2, None, None), (7, 3, 2, 2), (7, 3, 1, None), (9, 3, None, 1), (126, 10, 7, 7),
          (126, 15, 6, 3), (32, 4, None, None)]


@pytest.mark.parametrize("layers,pp,first,last", SPLITS)
def test_split_matches_megatron(layers, pp, first, last):
    from megatron.core.transformer.transformer_block import get_num_layers_to_build
    from megatron.core.transformer.transformer_layer import get_transformer_layer_offset

    from megatron_rlvr.models.llama import LlamaArch, transformer_config
    from megatron_rlvr.models.tiny import tiny_llama_config

    split = PipelineSplit(layers, pp, first, last)
    arch = LlamaArch.from_hf_config(tiny_llama_config("tiny", num_hidden_layers=layers))
    config = transformer_config(arch, pp=pp, first_stage_layers=first, last_stage_layers=last)
    assert PipelineSplit.from_config(config) == split
    assert sum(split.counts()) == layers
    for rank in range(pp):
        stage = split.layers(rank)
        assert len(stage) == get_num_layers_to_build(config, pp_rank=rank)
        assert stage.start == (get_transformer_layer_offset(config, pp_rank=rank) if pp > 1 else 0)


@pytest.mark.parametrize("layers,pp,first,last,message", [
    (7, 3, None, None, r"pipeline parallel size 3 does not divide num_hidden_layers=7; use one of \[1, 7\]"),
    (126, 10, 5, 5, r"leaves 116 layer\(s\) for 8 other stage\(s\).*first = last in \[3, 7, 11\]"),
    (7, 2, 3, 3, r"leaves 1 layer\(s\) for no other stage"),
    (7, 1, 3, None, r"need pipeline parallel size > 1"),
    (5, 4, 1, 1, r"leaves 3 layer\(s\) for 2 other stage\(s\)"),
    (2, 3, None, None, r"exceeds num_hidden_layers=2"),
    (6, 3, 0, None, r"at least one layer"),
])
def test_impossible_splits_name_the_fix(layers, pp, first, last, message):
    with pytest.raises(ValueError, match=message):
        PipelineSplit(layers, pp, first, last)


def test_names_follow_the_split():
    from megatron_rlvr.models import hf_mapping
    from megatron_rlvr.models.llama import LlamaArch
    from megatron_rlvr.models.tiny import tiny_llama_config

    arch = LlamaArch.from_hf_config(tiny_llama_config("tiny", num_hidden_layers=7))
    split = PipelineSplit(7, 3, 2, 2)
    owners = {}
    for layer in range(7):
        name = f"decoder.layers.{layer}.mlp.linear_fc2.weight"
        held = [(r, hf_mapping.local_name(name, arch, 3, r, split)) for r in range(3)]
        (rank, local), = [(r, n) for r, n in held if n is not None]
        assert hf_mapping.global_name(local, arch, 3, rank, split) == name
        owners[layer] = rank
    assert owners == {0: 0, 1: 0, 2: 1, 3: 1, 4: 1, 5: 2, 6: 2}
    with pytest.raises(ValueError, match="does not match the model's num_hidden_layers=7 at pp=2"):
        hf_mapping.stage_layers(arch, 2, 0, split)
