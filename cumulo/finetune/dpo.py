"""DPO (Rafailov et al. 2023, "Direct Preference Optimization") over a LoRA adapter.

loss = -log sigmoid(beta * ((log pi(y_w|x) - log ref(y_w|x)) - (log pi(y_l|x) - log ref(y_l|x))))

log pi(y|x) is the sum of the completion's token log-probs (its tokens and end of turn, as SFT's mask). The
reference model is the same base with the adapter switched off (`adapters_off`), so it costs no second copy of
the weights: one forward without gradients per batch. A pair's two sequences are packed into the same sequence
(attention kept inside each), so one packed sequence holds whole pairs and its loss is backpropagated on its
own. Implicit rewards are beta * (log pi - log ref); their margin and how often the chosen one is higher are
reported with the loss. With B = 0 (a fresh adapter) the policy is the reference and the loss is exactly log 2.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from cumulo.finetune.data import PackedSequence, assign, packed_sequence
from cumulo.finetune.lora import LoRALinear, adapters_off
from cumulo.finetune.preference import PreferencePair
from cumulo.models.attention import AttentionContext

DEFAULT_BETA = 0.1  # the paper's default; OpenAI's "auto" value is not published


def segment_logps(model: nn.Module, seq: PackedSequence, n_segments: int) -> torch.Tensor:
    """[n_segments] fp32: per packed example, the summed log-prob of its trained (labelled) tokens."""
    ctx = AttentionContext(kv_cache=None, segment_ids=seq.segment_ids)
    hidden = model(seq.input_ids, seq.positions, ctx)  # [T, hidden]
    keep = seq.labels != -100
    logits = model.compute_logits(hidden[keep])  # [n, vocab] fp32
    token_logps = -F.cross_entropy(logits, seq.labels[keep], reduction="none")  # [n]
    return token_logps.new_zeros(n_segments).index_add(0, seq.segment_ids[keep], token_logps)


def dpo_loss(
    chosen: torch.Tensor,
    rejected: torch.Tensor,
    ref_chosen: torch.Tensor,
    ref_rejected: torch.Tensor,
    beta: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per pair ([P] each): the loss, and the chosen and rejected implicit rewards (detached)."""
    chosen_ratio, rejected_ratio = chosen - ref_chosen, rejected - ref_rejected
    losses = -F.logsigmoid(beta * (chosen_ratio - rejected_ratio))
    return losses, beta * chosen_ratio.detach(), beta * rejected_ratio.detach()


@dataclass
class PreferenceObjective:
    """The trainer's objective for `method.type = "dpo"`: batches of PreferencePair."""

    model: nn.Module
    wrapped: dict[str, LoRALinear]
    beta: float
    max_seq_len: int

    def tokens(self, pair: PreferencePair) -> int:
        return pair.n_tokens

    def _groups(self, pairs: list[PreferencePair]) -> list[tuple[PackedSequence, int]]:
        """Whole pairs packed first-fit, chosen then rejected of each pair as consecutive segments."""
        out = []
        for group in assign([len(p) for p in pairs], 2 * self.max_seq_len):
            examples = [e for i in group for e in (pairs[i].chosen, pairs[i].rejected)]
            out.append((packed_sequence(examples), len(examples)))
        return out

    def _pass(self, pairs: list[PreferencePair], backward: bool) -> tuple[float, dict[str, float]]:
        total, margin, correct = 0.0, 0.0, 0
        for seq, n in self._groups(pairs):
            with torch.no_grad(), adapters_off(self.wrapped):
                ref = segment_logps(self.model, seq, n)  # [2k]: chosen, rejected, chosen, ...
            with torch.set_grad_enabled(backward):
                policy = segment_logps(self.model, seq, n)
                losses, chosen_reward, rejected_reward = dpo_loss(
                    policy[0::2], policy[1::2], ref[0::2], ref[1::2], self.beta
                )
            if backward:
                (losses.sum() / len(pairs)).backward()  # gradients of the batch mean
            total += float(losses.detach().sum())
            margin += float((chosen_reward - rejected_reward).sum())
            correct += int((chosen_reward > rejected_reward).sum())
        n_pairs = len(pairs)
        return total / n_pairs, {"reward_margin": margin / n_pairs, "reward_accuracy": correct / n_pairs}

    def step(self, batch: list[PreferencePair]) -> tuple[float, dict[str, float]]:
        return self._pass(batch, backward=True)

    def evaluate(self, pairs: list[PreferencePair]) -> tuple[float | None, dict[str, float]]:
        if not pairs:
            return None, {}
        return self._pass(pairs, backward=False)
