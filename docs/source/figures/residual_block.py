"""Draws residual_block.png: a ResNet block as torch.export captures it and as captum_graph rewrites it.

Run by the documentation build (captum_graph_docs.runner) in an empty folder;
the graphs are the real ones, so the figure follows the code. Needs matplotlib.
"""
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from torch import fx, nn  # noqa: E402
from torchvision.models.resnet import BasicBlock  # noqa: E402

from captum_graph import prepare  # noqa: E402
from captum_graph.attr import LRP  # noqa: E402
from captum_graph.capture import capture  # noqa: E402
from captum_graph.cloning import private_copy  # noqa: E402

RULE_COLOURS = {"EpsilonRule": "#9ecae1", "PassThroughRule": "#c7e9c0", "MoveRule": "#fdd0a2"}
UNSEEN = "#fcbba1"  # what Captum's LRP cannot give a rule
PLAIN = "#eeeeee"


def block() -> nn.Module:
    """The first block of a ResNet stage: a residual branch and a downsampling shortcut."""
    torch.manual_seed(0)
    shortcut = nn.Sequential(nn.Conv2d(8, 16, 1, stride=2, bias=False), nn.BatchNorm2d(16))
    return BasicBlock(8, 16, stride=2, downsample=shortcut).eval()


def tensor_nodes(graph: fx.Graph):
    """The nodes that compute tensors (no parameters, no output)."""
    return [n for n in graph.nodes if n.op in ("placeholder", "call_function", "call_module")]


def layout(nodes):
    """(column, row) per node: rows by longest path from the input, columns to keep branches apart."""
    row, place, taken = {}, {}, set()
    for node in nodes:
        parents = [a for a in node.all_input_nodes if a in row]
        row[node] = 1 + max((row[p] for p in parents), default=-1)
        preferred = min((place[p][0] for p in parents), default=0)
        column = preferred
        while (column, row[node]) in taken:
            column += 1
        place[node] = (column, row[node])
        taken.add(place[node])
    return place


def draw(axis, graph: fx.Graph, label, colour, title: str) -> None:
    nodes = tensor_nodes(graph)
    place = layout(nodes)
    for node in nodes:
        x, y = place[node]
        for parent in node.all_input_nodes:
            if parent not in place:
                continue
            px, py = place[parent]
            path_x, path_y = ([px, px, x], [-py, -(y - 1), -y]) if px != x and y - py > 1 else ([px, x], [-py, -y])
            axis.plot(path_x, path_y, color="#555555", linewidth=1.2, zorder=1)
        axis.annotate(
            label(node), (x, -y), ha="center", va="center", fontsize=8, zorder=2,
            bbox={"boxstyle": "round,pad=0.35", "facecolor": colour(node), "edgecolor": "#444444"},
        )
    columns = max(c for c, _ in place.values())
    axis.set_xlim(-0.7, columns + 0.7)
    axis.set_ylim(-max(r for _, r in place.values()) - 0.6, 0.6)
    axis.set_title(title, fontsize=10)
    axis.axis("off")


def main() -> None:
    model, x = block(), torch.randn(2, 8, 8, 8)
    captured = capture(private_copy(model), (x,)).graph_module.graph
    module_calls = {}
    for node in tensor_nodes(captured):
        stack = node.meta.get("nn_module_stack") or {}
        module_calls.setdefault(list(stack.values())[-1][0] if stack else None, []).append(node)

    def captured_label(node):
        if node.op == "placeholder":
            return "input"
        stack = node.meta.get("nn_module_stack") or {}
        where = list(stack.values())[-1][0] if stack else "no module"
        return f"aten.{node.target._opname}\n({where})"

    def captured_colour(node):
        stack = node.meta.get("nn_module_stack") or {}
        owner = list(stack.values())[-1][0] if stack else None
        functional = node.op == "call_function" and owner is None
        reused = owner is not None and module_calls[owner][0] is not node
        return UNSEEN if functional or reused else PLAIN

    lrp = LRP(model)
    rules = {a.node: a for a in lrp.rule_report(x)}
    rewritten = prepare(model, (x,)).graph_module

    def rewritten_label(node):
        if node.op == "placeholder":
            return "input"
        assignment = rules[node.name]
        return f"{assignment.qualname}: {assignment.module_type}\n{type(assignment.rule).__name__}"

    def rewritten_colour(node):
        return PLAIN if node.op == "placeholder" else RULE_COLOURS.get(type(rules[node.name].rule).__name__, PLAIN)

    figure, (left, right) = plt.subplots(1, 2, figsize=(9, 6.2))
    draw(left, captured, captured_label, captured_colour, "captured by torch.export (ATen)")
    draw(right, rewritten.graph, rewritten_label, rewritten_colour, "rewritten by captum_graph: module and rule")
    shown = {UNSEEN: "no rule in Captum's LRP: a functional operation, or a module's second call"}
    used = {type(a.rule).__name__ for a in rules.values()}
    shown.update({colour: name for name, colour in RULE_COLOURS.items() if name in used})
    patches = [plt.Rectangle((0, 0), 1, 1, facecolor=c, edgecolor="#444444") for c in shown]
    figure.legend(patches, list(shown.values()), loc="lower center", ncol=len(shown), fontsize=8, frameon=False)
    figure.tight_layout(rect=(0, 0.07, 1, 1))
    figure.savefig("residual_block.png", dpi=130)


if __name__ == "__main__":
    main()
