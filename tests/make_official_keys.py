"""Write tests/official_keys.json: every state_dict key of the official M2Restore network -> shape.

Derived by hand from the official module definitions (yz-wang/M2Restore net/M2Restore.py and
net/MOE_CLIPbias.py, mamba_ssm 1.1.1's Mamba) at the official hyper-parameters, independently of
our model code, so that tests/test_convert.py checks our converter against the official layout.
The frozen DA-CLIP (`daclip.*`) is left out: the converter drops it. Run from the repo root:
    python tests/make_official_keys.py
"""
import json
import math
import os

DIM, BLOCKS, REFINEMENT, HEADS, FFN = 48, [4, 6, 6, 8], 4, [1, 2, 4, 8], 2.66
ATOM_DIM, ATOM_NUM, COND = 256, 32, 64
EXPERTS, DEGRADATIONS, CLIP_DIM = 6, 6, 512
D_STATE, D_CONV, EXPAND = 16, 4, 2
OUT_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "official_keys.json")


def layer_norm(p, c):
    return {f"{p}.body.weight": [c], f"{p}.body.bias": [c]}


def gdfn(p, c):
    h = int(c * FFN)
    return {f"{p}.project_in.weight": [2 * h, c, 1, 1], f"{p}.dwconv.weight": [2 * h, 1, 3, 3],
            f"{p}.project_out.weight": [c, h, 1, 1]}


def transformer_block(p, c, heads):
    keys = {**layer_norm(f"{p}.norm1", c), **layer_norm(f"{p}.norm2", c), **gdfn(f"{p}.ffn", c)}
    keys.update({f"{p}.attn.temperature": [heads, 1, 1], f"{p}.attn.qkv.weight": [3 * c, c, 1, 1],
                 f"{p}.attn.qkv_dwconv.weight": [3 * c, 1, 3, 3],
                 f"{p}.attn.project_out.weight": [c, c, 1, 1]})
    return keys


def stage(p, c, count, heads):
    keys = {}
    for i in range(count):
        keys.update(transformer_block(f"{p}.{i}", c, heads))
    return keys


def cross_attention(p, c, heads):
    return {f"{p}.temperature": [heads, 1, 1], f"{p}.q.weight": [c, c, 1, 1],
            f"{p}.q_dwconv.weight": [c, 1, 3, 3], f"{p}.kv.weight": [2 * c, c, 1, 1],
            f"{p}.kv_dwconv.weight": [2 * c, 1, 3, 3], f"{p}.project_out.weight": [c, c, 1, 1]}


def fre_module(p, c, heads):
    keys = {f"{p}.conv.weight": [c, 3, 3, 3], f"{p}.conv1.weight": [c, 3, 3, 3],
            f"{p}.score_gen.weight": [2, 2, 7, 7], f"{p}.score_gen.bias": [2],
            f"{p}.para1": [c, 1, 1], f"{p}.para2": [c, 1, 1],
            f"{p}.frequency_refine.SpatialGate.spatial.weight": [1, 2, 7, 7],
            f"{p}.frequency_refine.ChannelGate.mlp.0.weight": [c // 16, c, 1, 1],
            f"{p}.frequency_refine.ChannelGate.mlp.2.weight": [c, c // 16, 1, 1],
            f"{p}.frequency_refine.proj.weight": [c, c, 1, 1], f"{p}.frequency_refine.proj.bias": [c],
            f"{p}.rate_conv.0.weight": [c // 8, c, 1, 1], f"{p}.rate_conv.2.weight": [2, c // 8, 1, 1]}
    for name in ("channel_cross_l", "channel_cross_h", "channel_cross_agg"):
        keys.update(cross_attention(f"{p}.{name}", c, heads))
    return keys


def mamba(p, c):
    inner, rank = EXPAND * c, math.ceil(c / 16)
    return {f"{p}.A_log": [inner, D_STATE], f"{p}.D": [inner],
            f"{p}.in_proj.weight": [2 * inner, c], f"{p}.conv1d.weight": [inner, 1, D_CONV],
            f"{p}.conv1d.bias": [inner], f"{p}.x_proj.weight": [rank + 2 * D_STATE, inner],
            f"{p}.dt_proj.weight": [inner, rank], f"{p}.dt_proj.bias": [inner],
            f"{p}.out_proj.weight": [c, inner]}


def mb_block(p, c):
    s = f"{p}.ssm"
    keys = {**layer_norm(f"{p}.norm1", c), **layer_norm(f"{p}.norm2", c), **gdfn(f"{p}.ffn", c),
            **mamba(f"{s}.mamba", c)}
    keys.update({f"{s}.norm.weight": [c], f"{s}.norm.bias": [c], f"{s}.norm2.weight": [c],
                 f"{s}.norm2.bias": [c],
                 f"{s}.prompt_proj.0.weight": [4 * c, CLIP_DIM], f"{s}.prompt_proj.0.bias": [4 * c],
                 f"{s}.prompt_proj.2.weight": [c, 4 * c], f"{s}.prompt_proj.2.bias": [c],
                 f"{s}.conv_path.0.weight": [c, 1, 3, 3], f"{s}.conv_path.0.bias": [c],
                 f"{s}.gate_net.0.weight": [c, 2 * c, 1, 1], f"{s}.gate_net.0.bias": [c],
                 f"{s}.gate_net.2.weight": [1, c, 1, 1], f"{s}.gate_net.2.bias": [1]})
    return keys


def mcdb(p, c):
    h = int(c * FFN)
    keys = {f"{p}.fc.weight": [c, ATOM_DIM], f"{p}.fc.bias": [c],
            f"{p}.model.degra_proj.weight": [EXPERTS, DEGRADATIONS],
            f"{p}.model.degra_proj.bias": [EXPERTS], f"{p}.model.gate_boost": [],
            f"{p}.model.w_g": [2 * c, EXPERTS], f"{p}.model.w_n": [2 * c, EXPERTS],
            f"{p}.model.mean": [1], f"{p}.model.std": [1]}  # the last two are buffers
    for i in range(EXPERTS):
        e = f"{p}.model.el.{i}"
        keys.update({f"{e}.fc1.weight": [h, c], f"{e}.fc1.bias": [h], f"{e}.fc2.weight": [c, h],
                     f"{e}.fc2.bias": [c]})
    return keys


def task_prompt(p):
    keys = {f"{p}.CondNet.0.weight": [COND, 3, 3, 3], f"{p}.CondNet.2.weight": [COND, COND, 3, 3],
            f"{p}.CondNet.4.weight": [COND, COND, 1, 1], f"{p}.CondNet.6.weight": [COND, COND, 1, 1],
            f"{p}.CondNet.8.weight": [32, COND, 1, 1],
            f"{p}.lastOut.weight": [ATOM_NUM, 32], f"{p}.lastOut.bias": [ATOM_NUM],
            f"{p}.dictionary": [ATOM_NUM, ATOM_DIM]}
    for i, c in ((0, COND), (2, COND), (4, COND), (6, COND), (8, 32)):
        keys[f"{p}.CondNet.{i}.bias"] = [c]
    return keys


def official_keys():
    w = [DIM, 2 * DIM, 4 * DIM, 8 * DIM]
    keys = {"patch_embed.proj.weight": [DIM, 3, 3, 3]}
    keys.update(fre_module("fre1", w[3], HEADS[2]))
    keys.update(fre_module("fre2", w[2], HEADS[2]))
    keys.update(fre_module("fre3", w[1], HEADS[2]))
    keys.update(stage("encoder_level1", w[0], BLOCKS[0], HEADS[0]))
    keys["down1_2.body.0.weight"] = [w[0] // 2, w[0], 3, 3]
    keys.update(stage("encoder_level2", w[1], BLOCKS[1], HEADS[1]))
    keys["down2_3.body.0.weight"] = [w[1] // 2, w[1], 3, 3]
    keys.update(stage("encoder_level3", w[2], BLOCKS[2], HEADS[2]))
    keys["down3_4.body.0.weight"] = [w[2] // 2, w[2], 3, 3]
    for i in range(BLOCKS[3]):
        keys.update(mb_block(f"latent.{i}", w[3]))
    keys["up4_3.body.0.weight"] = [2 * w[3], w[3], 3, 3]
    keys["reduce_chan_level3.weight"] = [w[2], w[3], 1, 1]
    keys.update(stage("decoder_level3", w[2], BLOCKS[2], HEADS[2]))
    keys["up3_2.body.0.weight"] = [2 * w[2], w[2], 3, 3]
    keys["reduce_chan_level2.weight"] = [w[1], w[2], 1, 1]
    keys.update(stage("decoder_level2", w[1], BLOCKS[1], HEADS[1]))
    keys["up2_1.body.0.weight"] = [2 * w[1], w[1], 3, 3]
    keys.update(stage("decoder_level1", w[1], BLOCKS[0], HEADS[0]))
    keys.update(stage("refinement", w[1], REFINEMENT, HEADS[0]))
    keys["output.weight"] = [3, w[1], 3, 3]
    keys.update(task_prompt("task_prompt"))
    for level, c in ((1, w[0]), (2, w[1]), (3, w[2])):
        keys.update(mcdb(f"mcdb{level}", c))
    return keys


if __name__ == "__main__":
    keys = official_keys()
    lines = [f"  {json.dumps(key)}: {json.dumps(keys[key])}" for key in sorted(keys)]
    with open(OUT_PATH, "w") as f:
        f.write("{\n" + ",\n".join(lines) + "\n}\n")
    params = sum(math.prod(s) for k, s in keys.items() if not k.endswith((".mean", ".std")))
    print(f"wrote {len(keys)} keys, {params} parameters, to {OUT_PATH}")
