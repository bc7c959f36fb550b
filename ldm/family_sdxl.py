"""The SDXL family: two text encoders, pooled text embeddings and size conditioning.

Prompt semantics are A1111's (and match diffusers' `StableDiffusionXLPipeline` where diffusers has
the feature):

* both encoders encode the same prompt in the same 75-token chunks (one BPE vocabulary, so one
  chunking; BREAK, weights and comma backtracking as for SD 1.x). CLIP-L pads with EOS, OpenCLIP
  bigG (`tokenizer_2`) with "!" (id 0);
* each encoder gives its penultimate hidden state without the final LayerNorm; clip skip n reads
  hidden state -(n + 1) of both encoders, for prompt and negative prompt alike (diffusers'
  `clip_skip=n-1`, which it applies to the prompt only);
* weights are applied and the chunk's mean restored per encoder, then the two are concatenated on
  the channel axis;
* the pooled vector is bigG's projected EOS output of the first chunk, before weighting;
* an empty negative prompt gives all-zero embeddings and pooled vector (diffusers'
  `force_zeros_for_empty_prompt` with `negative_prompt=None`);
* size conditioning: original = target = (height, width), crop (0, 0); a refiner U-Net (5 time ids)
  gets an aesthetic score instead of the target size (6.0 for the prompt, 2.5 for the negative);
* a textual-inversion embedding's `clip_l` vectors go into CLIP-L and its `clip_g` vectors into bigG, at
  the same token places (files without both parts are skipped for a base model, as in A1111).

The pooled vectors and time ids reach the U-Net through `AddedConditioning`, a loop extension whose
`unet_kwargs` passes `added_cond_kwargs` in the loop's [uncond, cond] row order (cond: one group per
AND sub-prompt). A scheduled prompt's pooled vectors change with its embeddings (ldm.conditioning).
"""
from __future__ import annotations

import torch

from .components import Components, ModelLoadError
from .conditioning import Conditioning, plan_for, scheduled
from .denoise import Extension, StepInfo
from .embeddings import EmbeddingTable, injected, joint
from .guidance import uses_cfg
from .latents import vae_scale_factor
from .params import GenerationParams
from .prompt_schedule import PromptPlan, StepTexts
from .prompts import Chunk, PromptEncoder, chunk_prompt

AESTHETIC_SCORE = 6.0  # refiner defaults, as diffusers
NEGATIVE_AESTHETIC_SCORE = 2.5


def is_sdxl(components: Components) -> bool:
    """SDXL U-Nets take added "text_time" conditioning (pooled text embeddings + size ids)."""
    return getattr(components.unet.config, "addition_embed_type", None) == "text_time"


class SDXLPromptEncoder(PromptEncoder):
    """One SDXL text encoder: hidden state -(clip_skip + 1), no final norm."""

    def hidden(self, ids: torch.Tensor, clip_skip: int) -> torch.Tensor:
        return self.hidden_and_pooled(ids, clip_skip)[0]

    def hidden_and_pooled(self, ids: torch.Tensor, clip_skip: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        out = self.text_encoder(ids, output_hidden_states=True)
        return out.hidden_states[-(clip_skip + 1)], getattr(out, "text_embeds", None)


class AddedConditioning(Extension):
    """SDXL's `added_cond_kwargs`: pooled text embeddings [B, proj] and time ids [B, n] per image,
    for the conditional and (when guided) the unconditional rows."""

    def __init__(self, pooled: torch.Tensor, time_ids: torch.Tensor, uncond_pooled: torch.Tensor | None,
                 uncond_time_ids: torch.Tensor | None):
        self.cond = {"text_embeds": pooled, "time_ids": time_ids}
        self.both = None if uncond_pooled is None else {
            "text_embeds": torch.cat([uncond_pooled, pooled]), "time_ids": torch.cat([uncond_time_ids, time_ids])}

    def unet_kwargs(self, step: StepInfo) -> dict:
        # Not step.batch(): the unconditional rows differ from the conditional ones.
        return {"added_cond_kwargs": self.both if step.guided else self.cond}


class SDXLFamily:
    """SDXL base (CLIP-L + OpenCLIP bigG) and refiner (bigG only) models."""

    name = "sdxl"

    def __init__(self, components: Components, embeddings=None):
        # embeddings: ldm.embeddings.EmbeddingFiles (a models folder's textual inversions), or None
        if components.text_encoder_2 is None or components.tokenizer_2 is None:
            raise ModelLoadError(f"{components.name}: an SDXL U-Net needs text_encoder_2 and tokenizer_2 (OpenCLIP "
                                 "bigG), which were not loaded")

        def encoder(tokenizer, text_encoder, part: str) -> SDXLPromptEncoder:
            width = text_encoder.get_input_embeddings().embedding_dim
            return SDXLPromptEncoder(tokenizer, text_encoder,
                                     embeddings.for_encoder(tokenizer, width, part) if embeddings else None)

        self.encoder_2 = encoder(components.tokenizer_2, components.text_encoder_2, "clip_g")
        self.encoder_1 = (None if components.text_encoder is None
                          else encoder(components.tokenizer, components.text_encoder, "clip_l"))
        self.encoders = [e for e in (self.encoder_1, self.encoder_2) if e is not None]
        self.prompts = self.encoders[0]
        self.unet = components.unet
        self.default_size = int(components.unet.config.sample_size) * vae_scale_factor(components.vae)
        self.max_clip_skip = min(int(e.text_encoder.config.num_hidden_layers) for e in self.encoders)
        self.time_ids_count = _time_ids_count(components)
        self.is_refiner = self.encoder_1 is None

    def tables(self) -> list[EmbeddingTable] | None:
        """Each encoder's embeddings for one prompt (a snapshot of the folder), or None without a models folder."""
        return joint([e.embeddings.table() for e in self.encoders]) if self.prompts.embeddings else None

    def chunks(self, text: str, tables: list[EmbeddingTable] | None) -> list[Chunk]:
        """One chunking for both encoders (one BPE vocabulary)."""
        if not tables:
            return chunk_prompt(text, self.prompts.tokens)
        return chunk_prompt(tables[0].explicit(text), self.prompts.tokens, tables[0])

    def token_count(self, text: str) -> int:
        return sum(len(c.ids) for c in self.chunks(text, self.tables()))

    def encode(self, p: GenerationParams, plan: PromptPlan | None = None) -> Conditioning:
        """p's conditioning, step by step as `plan` (by default p's own prompt schedule) says: every distinct
        text encoded once, all padded to one length; the pooled vectors follow the schedule too."""
        plan = plan or plan_for(p)
        guided = uses_cfg(p.guidance_scale)
        zero_negative = guided and p.negative_prompt == ""
        tables = self.tables()
        chunks = {t: self.chunks(t, tables) for t in plan.texts(negative=guided and not zero_negative)}
        used = [e for text_chunks in chunks.values() for c in text_chunks for _, e in c.fixes]
        n = max(len(c) for c in chunks.values())
        # Shorter texts are padded with empty chunks so that all have the same sequence length.
        encoded = {t: self.encode_chunks(c + [Chunk() for _ in range(n - len(c))], p.clip_skip, tables)
                   for t, c in chunks.items()}
        b = p.batch_size
        dtype = self.unet.dtype
        time_ids = self.time_ids(p.height, p.width, AESTHETIC_SCORE)
        uncond_time_ids = self.time_ids(p.height, p.width, NEGATIVE_AESTHETIC_SCORE)

        def build(texts: StepTexts) -> Conditioning:
            cond = torch.cat([encoded[t][0].repeat(b, 1, 1) for t in texts.conds])
            pooled = torch.cat([encoded[t][1].to(dtype).repeat(b, 1) for t in texts.conds])
            uncond = uncond_pooled = None
            if zero_negative:
                uncond, uncond_pooled = torch.zeros_like(cond[:b]), torch.zeros_like(pooled[:b])
            elif guided:
                uncond, uncond_pooled = encoded[texts.uncond]
                uncond, uncond_pooled = uncond.repeat(b, 1, 1), uncond_pooled.to(dtype).repeat(b, 1)
            added = AddedConditioning(pooled, time_ids.repeat(len(texts.conds) * b, 1), uncond_pooled,
                                      None if uncond is None else uncond_time_ids.repeat(b, 1))
            return Conditioning(cond, uncond, (added,), plan.weights)

        info = (self.prompts.embeddings.hashes(used),) if used else ()  # infotext "TI hashes"
        return scheduled(plan, build, info)

    def encode_chunks(self, chunks: list[Chunk], clip_skip: int,
                      tables: list[EmbeddingTable] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """([1, 77 * chunks, dim_1 + dim_2] embeddings, [1, proj] pooled vector of the first chunk); `tables`: the
        encoders' embeddings the chunks' places were made for (each encoder writes its own part's vectors)."""
        parts, pooled = [], None
        for i, enc in enumerate(self.encoders):
            rows = [[(1 + o, tables[i].named(e.name).vectors) for o, e in c.fixes] for c in chunks] if tables else []
            with injected(enc.text_encoder, rows):  # 1: BOS
                z, pooled_rows = enc.hidden_and_pooled(enc.token_ids(chunks), clip_skip)
            if enc is self.encoder_2:
                pooled = pooled_rows[:1]
            parts.append(enc.weighted(z, chunks).to(self.encoder_2.text_encoder.dtype))
        return torch.cat(parts, dim=-1), pooled

    def time_ids(self, height: int, width: int, aesthetic_score: float) -> torch.Tensor:
        """[1, n]: (h, w) + crop (0, 0) + target (h, w) for the base; + aesthetic score instead of the target for a refiner."""
        tail = (height, width) if self.time_ids_count == 6 else (aesthetic_score,)
        ids = (height, width, 0, 0, *tail)
        return torch.tensor([ids], dtype=self.unet.dtype, device=self.unet.device)


def _time_ids_count(components: Components) -> int:
    """6 (base: sizes) or 5 (refiner: aesthetic score), from the U-Net's added-embedding input width."""
    unet, enc = components.unet, components.text_encoder_2
    width = unet.add_embedding.linear_1.in_features - int(enc.config.projection_dim)
    count, rest = divmod(width, int(unet.config.addition_time_embed_dim))
    if rest or count not in (5, 6):
        raise ModelLoadError(f"{components.name}: the U-Net's added embedding takes {unet.add_embedding.linear_1.in_features} "
                         f"inputs, which fits neither SDXL base (6 time ids) nor refiner (5) with a text_encoder_2 "
                         f"projection of {enc.config.projection_dim}")
    return count
