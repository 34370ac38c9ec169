"""Relative-position bias tables (timm's ``RelPosBias``, used by the relpos ViTs): a table
(R, H) of per-(offset, head) biases gathered by a fixed index into an (H, N, N) bias that is added
to every example's attention logits.

The bias is broadcast over the batch, so example i's gradient of the bias is its own output
gradient g_i (H, N, N), and its gradient of the table is g_i scattered back through the index:
row r, head h receives the sum of g_i[h, n, m] over the (n, m) whose offset is r (an index_add,
like an embedding's). Materialised per example: B x R x H, small (R = (2W-1)^2 for a W x W
window).

timm's relpos attention, on its fused path, reads the bias through ``rel_pos.get_bias()`` and
hands it to scaled_dot_product_attention, where it is broadcast over the batch and the
per-example gradients are lost; while attached, that attention takes its unfused path instead
(the same maths, through ``rel_pos(attn)``), and ``detach()`` restores it."""

from __future__ import annotations

from ._registry import Rule, register_rule

try:
    from timm.layers.pos_embed_rel import RelPosBias
except ImportError:  # timm is optional
    RelPosBias = None


class GatheredBiasRule(Rule):
    """Rule for a module whose forward is ``attn + bias(table[index])`` (see module doc)."""

    capture = "projections"

    def forward(self, module, capture, attn, shared_rel_pos=None):
        (out,) = capture((attn,), lambda a: (a + module.get_bias(),))
        return out

    def per_example_grads(self, module, x, g):
        (g_out,) = g  # (B, H, N, N)
        batch, heads = g_out.shape[:2]
        rows = g_out.permute(0, 2, 3, 1).reshape(batch, -1, heads)  # (B, N * N, H), index order
        table = module.relative_position_bias_table
        grad = rows.new_zeros(batch, table.shape[0], heads)
        grad.index_add_(1, module.relative_position_index.view(-1), rows)
        return {"relative_position_bias_table": grad.to(table.dtype)}

    def adapt(self, model, path, module):
        """Turns the parent attention's fused path off while attached; returns the undo."""
        parent = model.get_submodule(path.rpartition(".")[0])
        if getattr(parent, "rel_pos", None) is module and getattr(parent, "fused_attn", False):
            parent.fused_attn = False
            return lambda: setattr(parent, "fused_attn", True)
        return None

    def plan(self, module, x, out, clipping):
        return "materialised (index scatter)", out[0].numel()


if RelPosBias is not None:
    register_rule(RelPosBias)(GatheredBiasRule)
