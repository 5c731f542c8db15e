"""Independent, deliberately naive reference of the official Bayes-PFL *test* path.

Written from notes taken on the official code (github.com/xiaozhen228/Bayes-PFL; the "spec §N" marks below
name sections of those notes: backbone, prompts, flows, RCA, scores, test path, checkpoints, hazards), never
from the package under test: nothing from ``inspector`` is imported here. It works on raw state-dict tensors
and follows the structure of the official code, not ours:

* one image at a time (the official test batch is 1, spec §7.1, §12.7);
* OpenAI's fp16 weight conversion is imitated by a float16 round trip (spec §1, loading);
* CLIP with exact erf GELU and hand-written softmax(QK^T/sqrt(d))V attention (spec §1);
* 2·R separate text-encoder calls of B full 77-token sequences (spec §7.1 step 5);
* every RCA level produces 2·B·R logit channels that are all upsampled before the two-way softmax
  (spec §4, §5.2), and the map is the plain mean of 4·B·R probability maps.

Plus the two random-weight factories used by the parity tests: an OpenAI-layout CLIP state dict and
an official ``MyModel`` head state dict with all 131 keys (spec §8).
"""

from __future__ import annotations

import math

import numpy as np
import open_clip
import torch
import torch.nn.functional as F
from PIL import Image

# spec §1: CLIP normalisation
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

# spec §2: the official folder-name -> prompt-name table; anything else lower-cased as is
CLASS_NAME_MAP = {
    "macaroni1": "macaroni",
    "macaroni2": "macaroni",
    "pcb1": "printed circuit board",
    "pcb2": "printed circuit board",
    "pcb3": "printed circuit board",
    "pcb4": "printed circuit board",
    "pipe_fryum": "pipe fryum",
    "chewinggum": "chewing gum",
    "metal_nut": "metal nut",
}

# spec §5.3: k = 20 for these class names, 2000 otherwise
SMALL_TOPK_CLASSES = ["capsules", "macaroni1", "macaroni2", "pipe_fryum", "screw", "cashew", "chewinggum"]

EOT_ID = 49407  # spec §2: the EOT is found as token id 49407


# =================================================================================================
# random weights
# =================================================================================================


def _normal(gen, shape, std, mean=0.0):
    return torch.randn(tuple(shape), generator=gen) * std + mean


def _ln_params(gen, width):
    return 1.0 + _normal(gen, (width,), 0.1), _normal(gen, (width,), 0.05)


def _resblock_params(gen, prefix, width, out):
    """One OpenAI CLIP residual block (nn.MultiheadAttention + c_fc/c_proj MLP)."""
    out[prefix + "attn.in_proj_weight"] = _normal(gen, (3 * width, width), width ** -0.5)
    out[prefix + "attn.in_proj_bias"] = _normal(gen, (3 * width,), 0.02)
    out[prefix + "attn.out_proj.weight"] = _normal(gen, (width, width), 0.5 * width ** -0.5)
    out[prefix + "attn.out_proj.bias"] = _normal(gen, (width,), 0.02)
    out[prefix + "ln_1.weight"], out[prefix + "ln_1.bias"] = _ln_params(gen, width)
    out[prefix + "mlp.c_fc.weight"] = _normal(gen, (4 * width, width), width ** -0.5)
    out[prefix + "mlp.c_fc.bias"] = _normal(gen, (4 * width,), 0.02)
    out[prefix + "mlp.c_proj.weight"] = _normal(gen, (width, 4 * width), 0.5 * (4 * width) ** -0.5)
    out[prefix + "mlp.c_proj.bias"] = _normal(gen, (width,), 0.02)
    out[prefix + "ln_2.weight"], out[prefix + "ln_2.bias"] = _ln_params(gen, width)


def make_openai_clip_state(vision_width, vision_layers, vision_patch, grid, text_width, text_layers,
                           embed_dim, vocab_size=49408, context_length=77, seed=0):
    """A random state dict in the OpenAI CLIP ViT layout (heads = width // 64, as OpenAI's builder)."""
    gen = torch.Generator().manual_seed(seed)
    W, E, D = vision_width, text_width, embed_dim
    s = {}
    # --- vision tower
    s["visual.conv1.weight"] = _normal(gen, (W, 3, vision_patch, vision_patch), 0.02)
    s["visual.class_embedding"] = _normal(gen, (W,), W ** -0.5)
    s["visual.positional_embedding"] = _normal(gen, (grid * grid + 1, W), W ** -0.5)
    s["visual.ln_pre.weight"], s["visual.ln_pre.bias"] = _ln_params(gen, W)
    for i in range(vision_layers):
        _resblock_params(gen, f"visual.transformer.resblocks.{i}.", W, s)
    s["visual.ln_post.weight"], s["visual.ln_post.bias"] = _ln_params(gen, W)
    s["visual.proj"] = _normal(gen, (W, D), W ** -0.5)
    # --- text tower
    s["token_embedding.weight"] = _normal(gen, (vocab_size, E), 0.02)
    s["positional_embedding"] = _normal(gen, (context_length, E), 0.01)
    for i in range(text_layers):
        _resblock_params(gen, f"transformer.resblocks.{i}.", E, s)
    s["ln_final.weight"], s["ln_final.bias"] = _ln_params(gen, E)
    s["text_projection"] = _normal(gen, (E, D), E ** -0.5)
    s["logit_scale"] = torch.tensor(math.log(1 / 0.07))
    # the integer entries the real OpenAI files carry
    s["input_resolution"] = torch.tensor(grid * vision_patch)
    s["context_length"] = torch.tensor(context_length)
    s["vocab_size"] = torch.tensor(vocab_size)
    return s


def _mlp3_params(gen, prefix, E, H, out, std):
    """InferenceBlock (spec §3.1): Linear(E->H), Softplus, Linear(H->H), Softplus, Linear(H->E)."""
    out[prefix + "0.weight"] = _normal(gen, (H, E), std)
    out[prefix + "0.bias"] = _normal(gen, (H,), 0.05)
    out[prefix + "2.weight"] = _normal(gen, (H, H), std)
    out[prefix + "2.bias"] = _normal(gen, (H,), 0.05)
    out[prefix + "4.weight"] = _normal(gen, (E, H), std)
    out[prefix + "4.bias"] = _normal(gen, (E,), 0.05)


def make_official_head_state(E, W, B=3, P=5, Q=5, K=10, levels=4, seed=0):
    """A random official ``MyModel`` state dict, every key and shape of spec §8 (131 keys at 4 levels).

    Shared modules appear under several names with the same values, as in the real files.
    """
    gen = torch.Generator().manual_seed(seed)
    H = W // 2  # hidden width d_theta = vision_width / 2 (spec §3.1)
    s = {}
    # spec §2: prompt banks
    s["prompt_context"] = _normal(gen, (B, P, E), 0.5)
    s["prompt_state_normal"] = _normal(gen, (B, Q, E), 0.5, mean=0.5)
    s["prompt_state_abnormal"] = _normal(gen, (B, Q, E), 0.5, mean=-0.5)
    s["temperature_pixel"] = torch.tensor(math.log(1 / 0.07)) + _normal(gen, (), 0.1)
    s["temperature_image"] = torch.tensor(math.log(1 / 0.07)) + _normal(gen, (), 0.1)

    # spec §3.1: base networks (encoders: f_mu and f_h; decoders: dead, f_mu-shaped only)
    enc = {}
    for name in ("context_encoder", "state_encoder"):
        _mlp3_params(gen, f"{name}.weight_mean.module.", E, H, enc, 0.1)
        _mlp3_params(gen, f"{name}.weight_log_variance.module.", E, H, enc, 0.1)
    for name in ("context_decoder", "state_decoder"):
        _mlp3_params(gen, f"{name}.weight_mean.module.", E, H, enc, 0.1)
    s.update(enc)

    def copy_of(prefix):
        return {k[len(prefix):]: v.clone() for k, v in enc.items() if k.startswith(prefix)}

    # spec §3.3: ISD flow object, amortised u, w (E -> K*E, k-major) and b (E -> K)
    for k, v in copy_of("context_encoder.").items():
        s["PFL_context.encoder." + k] = v
    for k, v in copy_of("context_decoder.").items():
        s["PFL_context.decoder." + k] = v
    s["PFL_context.p_mu.0.weight"] = _normal(gen, (E, E), 0.05)
    s["PFL_context.p_mu.0.bias"] = _normal(gen, (E,), 0.05)
    s["PFL_context.amor_u.weight"] = _normal(gen, (K * E, E), 0.05)
    s["PFL_context.amor_u.bias"] = _normal(gen, (K * E,), 0.05)
    s["PFL_context.amor_w.weight"] = _normal(gen, (K * E, E), 0.05)
    s["PFL_context.amor_w.bias"] = _normal(gen, (K * E,), 0.05)
    s["PFL_context.amor_b.weight"] = _normal(gen, (K, E), 0.05)
    s["PFL_context.amor_b.bias"] = _normal(gen, (K,), 0.05)

    # spec §3.4: IAD flow objects with free parameters; both share state_encoder / state_decoder
    for which in ("PFL_normal", "PFL_abnormal"):
        s[f"{which}.amor_u"] = _normal(gen, (1, K, E, 1), 0.3)
        s[f"{which}.amor_w"] = _normal(gen, (1, K, 1, E), 0.3)
        s[f"{which}.amor_b"] = _normal(gen, (1, K, 1, 1), 0.3)
        s[f"{which}.state"] = _normal(gen, (1, E), 0.5)
        for k, v in copy_of("state_encoder.").items():
            s[f"{which}.encoder." + k] = v
        for k, v in copy_of("state_decoder.").items():
            s[f"{which}.decoder." + k] = v
        s[f"{which}.p_mu.0.weight"] = _normal(gen, (E, E), 0.05)
        s[f"{which}.p_mu.0.bias"] = _normal(gen, (E,), 0.05)

    # spec §5.1: stage-2 fuse head
    s["fuse.fuse_modules.weight"] = _normal(gen, (H, levels * W), 0.05)
    s["fuse.fuse_modules.bias"] = _normal(gen, (H,), 0.05)
    s["fuse.compress.weight"] = _normal(gen, (1, H), 0.3)
    s["fuse.compress.bias"] = _normal(gen, (1,), 0.05)
    s["fuse.post_process.weight"] = _normal(gen, (E, H), 0.1)
    s["fuse.post_process.bias"] = _normal(gen, (E,), 0.05)
    # spec §4: RCA
    s["RCA.q_proj_pre.weight"] = _normal(gen, (E, E, 1), 0.1)
    s["RCA.q_proj_pre.bias"] = _normal(gen, (E,), 0.05)
    for l in range(levels):
        s[f"RCA.linear_proj.{l}.weight"] = _normal(gen, (E, W), 0.1)
    # spec §5.1: mappings
    s["class_mapping.weight"] = torch.eye(E) + _normal(gen, (E, E), 0.1)
    s["class_mapping.bias"] = _normal(gen, (E,), 0.05)
    s["image_mapping.weight"] = torch.eye(E) + _normal(gen, (E, E), 0.1)
    s["image_mapping.bias"] = _normal(gen, (E,), 0.05)
    return s


# =================================================================================================
# preprocessing (spec §1, image size)
# =================================================================================================


def reference_preprocess(image, size=518):
    """RGB uint8 array or PIL image -> [3, size, size].

    PIL bicubic resize to size x size (aspect ratio not kept), /255, CLIP mean/std (spec §1)."""
    if isinstance(image, np.ndarray):
        image = Image.fromarray(image)
    image = image.convert("RGB").resize((size, size), Image.BICUBIC)
    x = torch.tensor(np.array(image), dtype=torch.float32) / 255.0  # [S, S, 3]
    x = x.permute(2, 0, 1)
    mean = torch.tensor(CLIP_MEAN).reshape(3, 1, 1)
    std = torch.tensor(CLIP_STD).reshape(3, 1, 1)
    return (x - mean) / std


# =================================================================================================
# CLIP backbone (spec §1)
# =================================================================================================


def _fp16_round_trip(clip_state):
    """OpenAI's loader converts conv/linear/attention weights and biases and the two projections to
    fp16; the official code then casts the model back to fp32 (spec §1). Imitate it exactly."""
    out = {}
    for key, value in clip_state.items():
        converted = (
            key == "visual.conv1.weight"
            or key in ("text_projection", "visual.proj")
            or ".attn.in_proj_" in key
            or ".attn.out_proj." in key
            or ".mlp.c_fc." in key
            or ".mlp.c_proj." in key
        )
        if converted:
            out[key] = value.to(torch.float16).to(torch.float32)
        elif value.is_floating_point():
            out[key] = value.to(torch.float32)
        else:
            out[key] = value
    return out


def _resize_positional_embedding(pos, new_grid):
    """spec §1: bicubic, align_corners=False, antialias=True; the CLS position is kept."""
    cls_pos, grid_pos = pos[:1], pos[1:]
    old_grid = round(math.sqrt(grid_pos.shape[0]))
    width = pos.shape[1]
    if old_grid == new_grid:
        return pos
    img = grid_pos.reshape(1, old_grid, old_grid, width).permute(0, 3, 1, 2)
    img = F.interpolate(img, size=(new_grid, new_grid), mode="bicubic", align_corners=False, antialias=True)
    grid_pos = img.permute(0, 2, 3, 1).reshape(new_grid * new_grid, width)
    return torch.cat([cls_pos, grid_pos], dim=0)


def _layer_norm(x, state, prefix):
    return F.layer_norm(x, (x.shape[-1],), state[prefix + "weight"], state[prefix + "bias"], eps=1e-5)


def _gelu_exact(x):
    # spec §1: exact erf GELU, not QuickGELU
    return 0.5 * x * (1.0 + torch.erf(x / math.sqrt(2.0)))


def _self_attention(x, state, prefix, heads, mask=None):
    """nn.MultiheadAttention written out: x [L, C]; softmax(q k^T / sqrt(d) + mask) v per head."""
    _, C = x.shape
    d = C // heads
    qkv = x @ state[prefix + "in_proj_weight"].t() + state[prefix + "in_proj_bias"]
    q, k, v = qkv[:, :C], qkv[:, C:2 * C], qkv[:, 2 * C:]
    outputs = []
    for h in range(heads):
        qh, kh, vh = q[:, h * d:(h + 1) * d], k[:, h * d:(h + 1) * d], v[:, h * d:(h + 1) * d]
        scores = (qh @ kh.t()) / math.sqrt(d)
        if mask is not None:
            scores = scores + mask
        weights = torch.softmax(scores, dim=-1)
        outputs.append(weights @ vh)
    out = torch.cat(outputs, dim=-1)
    return out @ state[prefix + "out_proj.weight"].t() + state[prefix + "out_proj.bias"]


def _residual_block(x, state, prefix, heads, mask=None):
    x = x + _self_attention(_layer_norm(x, state, prefix + "ln_1."), state, prefix + "attn.", heads, mask)
    h = _layer_norm(x, state, prefix + "ln_2.")
    h = h @ state[prefix + "mlp.c_fc.weight"].t() + state[prefix + "mlp.c_fc.bias"]
    h = _gelu_exact(h)
    h = h @ state[prefix + "mlp.c_proj.weight"].t() + state[prefix + "mlp.c_proj.bias"]
    return x + h


def _count_blocks(state, prefix):
    i = 0
    while f"{prefix}{i}.ln_1.weight" in state:
        i += 1
    return i


def reference_encode_image(clip, pixels, image_size=518, feature_layers=(6, 12, 18, 24)):
    """One image [1, 3, S, S] -> g [D] (LN_post(CLS)@proj, not normalised) and the raw residual
    stream after each 1-indexed block in ``feature_layers`` without CLS, each [grid*grid, W] (spec §1)."""
    conv = clip["visual.conv1.weight"]
    width, patch = conv.shape[0], conv.shape[-1]
    heads = width // 64
    grid = image_size // patch
    x = F.conv2d(pixels, conv, stride=patch)  # [1, W, grid, grid], no bias
    x = x.reshape(width, grid * grid).t()  # row-major patch order
    x = torch.cat([clip["visual.class_embedding"].reshape(1, width), x], dim=0)
    x = x + _resize_positional_embedding(clip["visual.positional_embedding"], grid)
    x = _layer_norm(x, clip, "visual.ln_pre.")
    features = []
    n_blocks = _count_blocks(clip, "visual.transformer.resblocks.")
    for i in range(n_blocks):
        x = _residual_block(x, clip, f"visual.transformer.resblocks.{i}.", heads)
        if (i + 1) in feature_layers:
            features.append(x[1:].clone())
    g = _layer_norm(x[0], clip, "visual.ln_post.") @ clip["visual.proj"]
    return g, features


def _prompt_name(class_name):
    return CLASS_NAME_MAP.get(class_name, class_name.lower())


def reference_encode_text(clip, learned, class_name):
    """One official text call: learned [B, P+Q, E] token embeddings replace the "X" of
    "X <prompt name>" (spec §2); full 77-token sequences with an explicit causal mask; read at EOT+P+Q-1."""
    n_batch, n_learned, width = learned.shape
    heads = width // 64
    tokens = open_clip.tokenize(["X " + _prompt_name(class_name)])[0]  # [77]
    ctx = tokens.shape[0]
    eot = int((tokens == EOT_ID).nonzero()[0, 0])
    emb = clip["token_embedding.weight"][tokens]  # [77, E]
    mask = torch.full((ctx, ctx), float("-inf")).triu(1)
    outs = []
    for b in range(n_batch):
        seq = torch.cat([emb[:1], learned[b], emb[2:]], dim=0)[:ctx]  # cut the tail at 77
        x = seq + clip["positional_embedding"]
        for i in range(_count_blocks(clip, "transformer.resblocks.")):
            x = _residual_block(x, clip, f"transformer.resblocks.{i}.", heads, mask)
        x = _layer_norm(x, clip, "ln_final.")
        outs.append(x[eot + n_learned - 1] @ clip["text_projection"])
    return torch.stack(outs)


# =================================================================================================
# prompt flows (spec §3)
# =================================================================================================


def _linear(x, head, prefix):
    return x @ head[prefix + "weight"].t() + head[prefix + "bias"]


def _inference_block(x, head, prefix):
    x = F.softplus(_linear(x, head, prefix + "0."))
    x = F.softplus(_linear(x, head, prefix + "2."))
    return _linear(x, head, prefix + "4.")


def _base_distribution(x, head, encoder):
    """spec §3.1: mu = f_mu(x); "var" v = exp(f_h(x) / 2); the sample uses std = sqrt(v)."""
    mu = _inference_block(x, head, encoder + ".weight_mean.module.")
    var = torch.exp(0.5 * _inference_block(x, head, encoder + ".weight_log_variance.module."))
    return mu, var


def _planar_step(z, u, w, b):
    """spec §3.2: z' = z + u * tanh(w^T z + b); z [E], u [E], w [E], b scalar."""
    return z + u * torch.tanh(torch.dot(w, z) + b)


def reference_isd_samples(head, g, eps, K):
    """spec §3.3: image-specific samples [R, E]; u, w, b amortised from g, index k*E + i = flow k, dim i."""
    E = g.shape[0]
    mu, var = _base_distribution(g, head, "context_encoder")
    u = _linear(g, head, "PFL_context.amor_u.").reshape(K, E)
    w = _linear(g, head, "PFL_context.amor_w.").reshape(K, E)
    b = _linear(g, head, "PFL_context.amor_b.").reshape(K)
    samples = []
    for r in range(eps.shape[0]):
        z = mu + torch.sqrt(var) * eps[r]
        for k in range(K):
            z = _planar_step(z, u[k], w[k], b[k])
        samples.append(z)
    return torch.stack(samples)


def reference_iad_samples(head, which, eps, K):
    """spec §3.4: image-agnostic samples [R, E] from ``{which}.state`` through the SHARED state_encoder."""
    x = head[f"{which}.state"].reshape(-1)
    E = x.shape[0]
    mu, var = _base_distribution(x, head, "state_encoder")
    u = head[f"{which}.amor_u"].reshape(K, E)
    w = head[f"{which}.amor_w"].reshape(K, E)
    b = head[f"{which}.amor_b"].reshape(K)
    samples = []
    for r in range(eps.shape[0]):
        z = mu + torch.sqrt(var) * eps[r]
        for k in range(K):
            z = _planar_step(z, u[k], w[k], b[k])
        samples.append(z)
    return torch.stack(samples)


# =================================================================================================
# heads (spec §4, §5)
# =================================================================================================


def _l2(x):
    return x / x.norm(dim=-1, keepdim=True)


def reference_fuse(head, patch_tokens):
    """spec §5.1 Global_Feature: concat levels -> Linear -> softmax-over-tokens weights -> pool -> Linear."""
    X = torch.cat(patch_tokens, dim=-1)  # [T, levels*W]
    Y = _linear(X, head, "fuse.fuse_modules.")  # [T, H]
    alpha = torch.softmax(_linear(Y, head, "fuse.compress.")[:, 0], dim=0)  # [T]
    y = (alpha[:, None] * Y).sum(dim=0)
    return _linear(y, head, "fuse.post_process.")


def reference_rca(head, level, text, patches, n_heads=4):
    """spec §4 for one level: text [M, E] (normalised), patches [T, W] -> (T' [M, E], F' [T, E])."""
    Fp = _l2(patches @ head[f"RCA.linear_proj.{level}.weight"].t())  # no bias
    E = Fp.shape[1]
    wq = head["RCA.q_proj_pre.weight"][:, :, 0]  # Conv1d k=1 == matmul
    query = text @ wq.t() + head["RCA.q_proj_pre.bias"]
    d = E // n_heads
    outs = []
    for h in range(n_heads):
        qh, kh = query[:, h * d:(h + 1) * d], Fp[:, h * d:(h + 1) * d]
        attn = torch.softmax((qh @ kh.t()) * E ** -0.5, dim=-1)  # scale with the full width E
        outs.append(attn @ kh)  # values are the keys
    refined = _l2(text + torch.cat(outs, dim=-1))
    return refined, Fp


def reference_predict(clip_state, head_state, pixels, class_name, eps_isd, eps_iad_normal, eps_iad_abnormal,
                      image_size=518, feature_layers=(6, 12, 18, 24), B=3, P=5, Q=5, K=10, stage=2):
    """The official test path for ONE image (spec §7.1): returns (anomaly_map [S, S], text_score [])."""
    with torch.no_grad():
        clip = _fp16_round_trip(clip_state)
        head = {k: v.float() for k, v in head_state.items()}
        R = eps_isd.shape[0]

        # step 1: vision
        g, patch_tokens = reference_encode_image(clip, pixels, image_size, feature_layers)

        # steps 2-3: ISD and IAD samples
        z_isd = reference_isd_samples(head, g, eps_isd, K)
        z_state = {
            "normal": reference_iad_samples(head, "PFL_normal", eps_iad_normal, K),
            "abnormal": reference_iad_samples(head, "PFL_abnormal", eps_iad_abnormal, K),
        }

        # steps 4-5: 2·R text calls of B sequences; order s·(B·R) + r·B + b
        text = []
        for s in ("normal", "abnormal"):
            for r in range(R):
                context = head["prompt_context"] + z_isd[r]  # [B, P, E], same vector on all tokens
                state = head[f"prompt_state_{s}"] + z_state[s][r]  # [B, Q, E]
                learned = torch.cat([context, state], dim=1)
                text.append(reference_encode_text(clip, learned, class_name))
        t = _l2(torch.cat(text, dim=0))  # [2BR, D]
        M = t.shape[0]
        BR = M // 2

        # step 6: text score (spec §5.1)
        if stage == 1:
            v = g
        else:
            v = _linear(g + reference_fuse(head, patch_tokens), head, "image_mapping.")
        mapped = _linear(t, head, "class_mapping.")
        logits = torch.exp(head["temperature_image"]) * (_l2(mapped) @ _l2(v))  # [2BR]
        probs = []
        for r in range(R):
            for b in range(B):
                i = r * B + b
                pair = torch.softmax(torch.stack([logits[i], logits[BR + i]]), dim=0)
                probs.append(pair[1])
        text_score = torch.stack(probs).mean()

        # steps 7-8: RCA per level, upsample all 2BR channels, two-way softmax, mean over 4·B·R maps
        grid = image_size // clip["visual.conv1.weight"].shape[-1]
        maps = []
        for level, tokens in enumerate(patch_tokens):
            refined, Fp = reference_rca(head, level, t, tokens)
            Z = torch.exp(head["temperature_pixel"]) * (Fp @ refined.t())  # [T, 2BR]
            Z = Z.t().reshape(1, M, grid, grid)
            Z = F.interpolate(Z, size=(image_size, image_size), mode="bilinear", align_corners=True)[0]
            for r in range(R):
                for b in range(B):
                    i = r * B + b
                    pair = torch.softmax(torch.stack([Z[i], Z[BR + i]]), dim=0)
                    maps.append(pair[1])
        anomaly_map = torch.stack(maps).mean(dim=0)
        return anomaly_map, text_score


def reference_topk(anomaly_map, class_name):
    """spec §5.3: mean of the top-k values of the unsmoothed map; k by class name."""
    k = 20 if class_name in SMALL_TOPK_CLASSES else 2000
    values = anomaly_map.reshape(-1).sort(descending=True).values
    return values[:k].mean()
