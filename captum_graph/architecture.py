"""A read-only view of a traced model: nodes, queries and the Grad-CAM target."""
import difflib
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.fx as fx
from torch import nn

from .passes import input_dependent_nodes



__all__ = ["ModelArchitecture", "NodeInfo"]


def _target_name(node: fx.Node) -> str:
    if isinstance(node.target, torch._ops.OpOverload):
        return str(node.target)  # 'aten.add.Tensor', as meta["replaced"]
    if node.op == "call_function":
        module = getattr(node.target, "__module__", None) or ""
        module = "operator" if module == "_operator" else module
        name = getattr(node.target, "__name__", str(node.target))
        return f"{module}.{name}" if module else name
    return str(node.target)


@dataclass(frozen=True, eq=False)
class NodeInfo:
    """One node of a traced model, with helpers for finding layers.

    ``opcode``, ``name`` and ``target`` mirror the fx node (``target`` as a
    string, e.g. ``'layer1.0.conv1'`` or ``'operator.add'``); the other
    attributes are computed from the node and its graph.
    """

    opcode: str
    name: str
    target: str
    _node: fx.Node = field(repr=False, compare=False)
    _architecture: "ModelArchitecture" = field(repr=False, compare=False)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, NodeInfo) and other._node is self._node

    def __hash__(self) -> int:
        return hash(self._node)

    @property
    def qualname(self) -> str:
        """The qualified name: module path plus operation, e.g. ``'layer1.0.add'``."""
        return self._node.meta.get("qualname", self.name)

    @property
    def meta(self) -> Dict[str, Any]:
        """The fx node's ``meta`` dictionary (``nn_module_stack``, ``stack_trace``, ``tensor_meta``, ...)."""
        return self._node.meta

    @property
    def args(self) -> Tuple[Any, ...]:
        """The node's positional arguments, graph nodes among them as :class:`NodeInfo`."""
        return self._architecture._wrap(self._node.args)

    @property
    def kwargs(self) -> Dict[str, Any]:
        """The node's keyword arguments, graph nodes among them as :class:`NodeInfo`."""
        return self._architecture._wrap(dict(self._node.kwargs))

    @property
    def users(self) -> Tuple["NodeInfo", ...]:
        """The nodes that take this node's output as an argument."""
        return tuple(self._architecture._info(user) for user in self._node.users)

    @property
    def next(self) -> Optional["NodeInfo"]:
        """The node after this one in execution order (``None`` after the last)."""
        return self._architecture._neighbour(self._node.next)

    @property
    def prev(self) -> Optional["NodeInfo"]:
        """The node before this one in execution order (``None`` before the first)."""
        return self._architecture._neighbour(self._node.prev)

    @property
    def operator(self) -> Any:
        """The module called (``call_module``), the function, or the method name."""
        if self.opcode == "call_module":
            return self._architecture._called_module(self._node)
        if self.opcode == "get_attr":
            return _get_attr(self._architecture.root, self.target)
        return self._node.target

    @property
    def owning_module(self) -> Optional[Tuple[str, nn.Module]]:
        """The ``(qualified name, module)`` this node belongs to.

        For a module call, the module itself; for a functional operation, the
        innermost module whose ``forward`` performed it; ``None`` at top level.
        """
        if self.opcode == "call_module" and "replaced" not in self.meta:
            return _module_path(self._node), self.operator
        stack = self._node.meta.get("nn_module_stack")
        if not stack:
            return None
        path = list(stack.values())[-1][0]
        return path, self._architecture.module_at(path)

    @property
    def shape(self) -> Optional[torch.Size]:
        """The output shape, when shapes were propagated (see ``propagate_shapes``)."""
        shape = getattr(self._node.meta.get("tensor_meta"), "shape", None)
        return None if shape is None else self._architecture._concrete(shape)

    def to_dict(self) -> Dict[str, str]:
        """``opcode``, ``name`` and ``target`` as a dictionary (JSON-ready)."""
        return {"opcode": self.opcode, "name": self.name, "target": self.target}


def _get_attr(root: nn.Module, target: str) -> Any:
    owner, _, attr = target.rpartition(".")
    return getattr(root.get_submodule(owner) if owner else root, attr)


class ModelArchitecture:
    """Graph queries on a traced model (seed API of ``open_xai.detector``).

    Args:
        graph: an fx graph owned by a GraphModule, e.g. ``symbolic_trace(m).graph``
            or the rewritten graph of :func:`captum_graph.prepare`.
        model: the traced model, if at hand: container modules (which a
            GraphModule keeps only as empty shells) are then the model's own.

    Examples::

        >>> arch = ModelArchitecture.from_model(torchvision.models.resnet18())
        >>> arch.get_node("layer1.0.add")
        NodeInfo(opcode='call_module', name='layer1_0_add', target='layer1.0.add')
    """

    def __init__(self, graph: fx.Graph, model: Optional[nn.Module] = None) -> None:
        if graph.owning_module is None:
            raise ValueError("the graph must belong to a GraphModule (fx.GraphModule(root, graph))")
        self.graph = graph
        self.root: fx.GraphModule = graph.owning_module
        self.model = model if model is not None else self.root
        self.example_inputs: Optional[Tuple[torch.Tensor, ...]] = None
        self._infos: Dict[fx.Node, NodeInfo] = {}
        self._names: Tuple[int, Dict[str, fx.Node]] = (-1, {})

    @classmethod
    def from_model(cls, model: nn.Module, example_inputs: Optional[Sequence[Any]] = None, fold_batch_norm: bool = False) -> "ModelArchitecture":
        """Capture ``model`` at ``example_inputs`` and view its rewritten graph (see :func:`captum_graph.prepare`).

        ``example_inputs`` are the positional arguments of a call; by default
        one random image for the model's first convolution. Every node then
        has its real output shape.
        """
        from .prepare import prepare

        return prepare(model, example_inputs, fold_batch_norm).architecture(model)

    # -- nodes ------------------------------------------------------------
    def list_nodes(self) -> List[NodeInfo]:
        """All nodes in execution order."""
        return [self._info(node) for node in self.graph.nodes]

    def get_node(self, name: str) -> NodeInfo:
        """The node with fx name ``name`` (``'add_7'``) or qualified name (``'layer4.1.add'``).

        Raises:
            KeyError: no such node; the message suggests close names.
        """
        node = self._lookup().get(name)
        if node is None:
            candidates = difflib.get_close_matches(name, list(self._lookup()), n=5)
            hint = f" Did you mean: {', '.join(repr(c) for c in candidates)}?" if candidates else ""
            raise KeyError(f"no node named {name!r} in {type(self.root).__name__}.{hint} See list_nodes() for all names.")
        return self._info(node)

    def find_node(
        self,
        filter_func: Callable[[NodeInfo], bool],
        base_node: Optional[NodeInfo] = None,
        all: bool = False,  # noqa: A002 - the seed API's name
    ) -> Union[Optional[NodeInfo], List[NodeInfo]]:
        """The first node (or ``all`` nodes) for which ``filter_func`` is true.

        With ``base_node``, only nodes downstream of it (reachable through its
        users, itself excluded) are searched, in execution order.
        """
        nodes = self.list_nodes() if base_node is None else self._downstream(base_node)
        matches = (info for info in nodes if filter_func(info))
        return list(matches) if all else next(matches, None)

    def branches(self, node: Union[str, NodeInfo]) -> List[List[NodeInfo]]:
        """For a merge (addition, concatenation), the nodes on each input branch.

        A branch runs from just after the fork (the last node that all inputs
        depend on) to the input of the merge; the skip connection of a
        residual block is typically an empty branch or a lone downsample.
        Returns one list per tensor input, in execution order.
        """
        info = self.get_node(node) if isinstance(node, str) else node
        inputs = [arg for arg in info._node.all_input_nodes]
        ancestry = [_ancestors(arg) | {arg} for arg in inputs]
        common = set.intersection(*ancestry) if ancestry else set()
        order = {n: i for i, n in enumerate(self.graph.nodes)}
        fork = max(common, key=order.__getitem__) if common else None
        before_fork = (_ancestors(fork) | {fork}) if fork is not None else set()
        return [
            [self._info(n) for n in sorted(nodes - before_fork, key=order.__getitem__)] for nodes in ancestry
        ]

    # -- Grad-CAM -----------------------------------------------------------
    def find_cam_target_module(self) -> Optional[Tuple[str, nn.Module]]:
        """The module whose output Grad-CAM should explain, or ``None``.

        The choice is the last feature map with spatial extent before global
        pooling that every path from the input to the output passes through,
        preferring the output of a module (see :meth:`find_cam_target_node`).
        Token models (ViT) have none: ``None``, as in the seed API.
        """
        node = self.find_cam_target_node()
        if node is None or node.shape is None or len(node.shape) != 4:
            return None  # a token model's target is tokens (ViT): no feature map, as in the seed API
        return self._module_producing(node)

    def find_cam_target_node(self, tokens: bool = True) -> Optional[NodeInfo]:
        """The node behind :meth:`find_cam_target_module` (may be functional).

        With ``tokens``, the last token node whose patch tokens reach the
        output (see ``_last_patch_token_node``) where it comes after the last
        feature map (a ViT's patch embedding is a feature map, its blocks'
        tokens come later).
        """
        self._ensure_shapes()
        # adaptive pooling to a fixed grid is part of the head, never the target
        chain = [node for node in cut_nodes(self.graph) if _is_feature_map(node) and not _is_pooling(node)]
        feature = next((n for n in reversed(chain) if self._module_producing(self._info(n)) is not None), None)
        feature = feature or (chain[-1] if chain else None)
        order = {node: i for i, node in enumerate(self.graph.nodes)}
        after = order[chain[-1]] if chain else -1
        if tokens and any(_is_token_sequence(node) for node in self.graph.nodes if order[node] > after):
            token = self._last_patch_token_node()
            if token is not None and order[token._node] > after:
                return token
        return None if feature is None else self._info(feature)

    def token_grid_reference(self, node: Union[str, NodeInfo]) -> Optional[NodeInfo]:
        """For a token node ``(N, T, C)``, the nearest upstream node that holds the grid its tokens form
        (the same batch: not heads or windows folded into it), or ``None``.

        That is a feature map ``(N, C, h, w)`` (a convolutional patch
        embedding), or, where patches are embedded by a linear layer, the
        reshape that cuts the image into ``h x w`` patches (see
        :meth:`token_grid_dims`).
        """
        info = self.get_node(node) if isinstance(node, str) else node
        shape = info.shape
        if shape is None or len(shape) != 3 or shape[0] != self._batch_size(shape[0]):
            return None
        upstream = _ancestors(info._node)
        for candidate in reversed(list(self.graph.nodes)):
            if candidate not in upstream:
                continue
            grid = self._info(candidate).shape
            if _is_feature_map(candidate):
                if grid[0] == shape[0] and 0 < grid[2] * grid[3] <= shape[1] and grid[1] == shape[2]:
                    return self._info(candidate)
                continue
            dims = self._patch_grid_dims(candidate)
            if dims is not None and grid[0] == shape[0] and 1 < grid[dims[0]] * grid[dims[1]] <= shape[1]:
                return self._info(candidate)
        return None

    def token_grid_dims(self, reference: Union[str, NodeInfo]) -> Tuple[int, int]:
        """The dimensions of a :meth:`token_grid_reference` node that hold the grid's height and width:
        ``(2, 3)`` for a feature map, ``(2, 4)`` for a cut ``(N, C, h, p, w, p)``."""
        info = self.get_node(reference) if isinstance(reference, str) else reference
        return self._patch_grid_dims(info._node) or (2, 3)

    def _patch_grid_dims(self, node: fx.Node) -> Optional[Tuple[int, int]]:
        """Where ``node`` cuts an image into patches for a linear embedding: the positions of the patch
        counts along height and width in its output; else ``None``.

        The cut is a reshape splitting two adjacent dimensions of a 4-D
        tensor in two each, ``(N, C, H, W) -> (N, C, h, H/h, w, W/w)`` (or
        channels last). Its patches must become tokens in row-major order:
        permutations may follow, then a reshape that merges the two patch
        counts, height first, into one dimension (``einops``'
        ``b c (h p) (w q) -> b (h w) (p q c)``), as the reading of tokens as
        a grid assumes.
        """
        if _reshape_packet(node) is None:
            return None
        source, cut = self._info(node.args[0]).shape, self._info(node).shape
        if source is None or cut is None or len(source) != 4 or len(cut) != 6:
            return None
        for k in (1, 2):  # the split dimensions: (H, W) of (N, C, H, W) or of (N, H, W, C)
            same = cut[:k] == source[:k] and cut[k + 4 :] == source[k + 2 :]
            if same and cut[k] * cut[k + 1] == source[k] and cut[k + 2] * cut[k + 3] == source[k + 1]:
                return (k, k + 2) if self._merged_row_major(node, [k, k + 2]) else None
        return None

    def _merged_row_major(self, node: fx.Node, positions: List[int]) -> bool:
        """Whether the dimensions at ``positions`` of ``node`` (height, width), moved only by
        permutations, are merged in that order into one dimension by a reshape."""
        while len(node.users) == 1:
            (user,) = node.users
            before, after = self._info(node).shape, self._info(user).shape
            if before is None or after is None:
                return False
            packet = getattr(user.target, "overloadpacket", None)
            if packet is torch.ops.aten.permute:
                order = [d % len(before) for d in user.args[1]]
                positions = [order.index(p) for p in positions]
            elif packet is torch.ops.aten.transpose:
                a, b = (d % len(before) for d in user.args[1:3])
                positions = [b if p == a else a if p == b else p for p in positions]
            elif _reshape_packet(user) is not None:
                h, w = positions
                return w == h + 1 and len(after) > h and after[:h] == before[:h] and after[h] == before[h] * before[w]
            else:
                return False
            node = user
        return False

    def _batch_size(self, default: int) -> int:
        """The batch size of the first tensor input, as captured (``default`` where unknown)."""
        for placeholder in self.graph.find_nodes(op="placeholder"):
            shape = self._info(placeholder).shape
            if shape:
                return shape[0]
        return default

    def _last_patch_token_node(self) -> Optional[NodeInfo]:
        """The last token node ``(N, T, C)`` whose patch tokens (not only the first) reach the output.

        Found by one forward and backward pass on the example input: in a ViT
        only the class token reaches the head after the last attention, so the
        answer is the last attention's input.
        """
        from .prepare import default_example_inputs
        from .shapes import token_gradients

        example = self.example_inputs or default_example_inputs(self.model)
        if example is None:
            return None
        reaching = token_gradients(self.root, example)
        for node in reversed(list(self.graph.nodes)):
            if reaching.get(node) and self.token_grid_reference(self._info(node)) is not None:
                return self._info(node)
        return None

    # -- shapes -------------------------------------------------------------
    def propagate_shapes(self, example_inputs: Sequence[torch.Tensor]) -> None:
        """Record each node's output shape by running ``example_inputs`` once."""
        from .shapes import propagate_shapes

        self.example_inputs = tuple(example_inputs)
        propagate_shapes(self.root, example_inputs)

    def _ensure_shapes(self) -> None:
        if any("tensor_meta" in node.meta for node in self.graph.nodes):
            return
        from .prepare import default_example_inputs

        self.propagate_shapes(self.example_inputs or default_example_inputs(self.model))

    # -- helpers ------------------------------------------------------------
    def module_at(self, path: str) -> nn.Module:
        """The module at qualified ``path``: the model's own, else the graph's."""
        try:
            return self.model.get_submodule(path)
        except AttributeError:
            return self.root.get_submodule(path)

    def _called_module(self, node: fx.Node) -> nn.Module:
        """For a call of one of the model's modules, the model's own; else the graph's (a rewritten operation)."""
        graph_module = self.root.get_submodule(node.target)
        if "replaced" in node.meta or self.model is self.root:
            return graph_module
        try:
            module = self.model.get_submodule(_module_path(node))
        except AttributeError:
            return graph_module
        return module if type(module) is type(graph_module) else graph_module

    def _concrete(self, shape: torch.Size) -> torch.Size:
        """``shape`` with symbolic sizes (a dynamic batch) at the example inputs' sizes."""
        if all(isinstance(size, int) for size in shape):
            return shape
        bindings = {}
        for node, example in zip(self.graph.find_nodes(op="placeholder"), self.example_inputs or ()):
            value = node.meta.get("val")
            if isinstance(value, torch.Tensor) and isinstance(example, torch.Tensor):
                for symbolic, size in zip(value.shape, example.shape):
                    if isinstance(symbolic, torch.SymInt):
                        bindings[symbolic.node.expr] = size
        exprs = [size if isinstance(size, int) else size.node.expr.xreplace(bindings) for size in shape]
        return torch.Size(int(e) if isinstance(e, int) or e.is_number else s for e, s in zip(exprs, shape))

    def _module_producing(self, info: NodeInfo) -> Optional[Tuple[str, nn.Module]]:
        """The innermost non-root module of the model whose output is exactly this node."""
        if info.opcode == "call_module" and "replaced" not in info.meta:
            return info.owning_module
        stack = info.meta.get("nn_module_stack")
        if not stack:
            return None
        path = list(stack.values())[-1][0]
        owner = path, self.module_at(path)
        last = [n for n in self.graph.nodes if _owned_by(n, owner[0])]
        return owner if last and last[-1] is info._node else None

    def _lookup(self) -> Dict[str, fx.Node]:
        """Names to nodes, rebuilt only when the graph's size changes (a rewrite)."""
        size = len(self.graph.nodes)
        if self._names[0] != size:
            # as captum_graph.layers resolves names: fx names, then qualified names over them
            table: Dict[str, fx.Node] = {}
            for node in self.graph.nodes:
                table.setdefault(node.name, node)
                table.setdefault(node.meta.get("original_name", node.name), node)
            table.update({node.meta["qualname"]: node for node in self.graph.nodes if "qualname" in node.meta})
            self._names = (size, table)
        return self._names[1]

    def _info(self, node: fx.Node) -> NodeInfo:
        info = self._infos.get(node)
        if info is None:
            info = NodeInfo(node.op, node.name, _target_name(node), node, self)
            self._infos[node] = info
        return info

    def _neighbour(self, node: fx.Node) -> Optional[NodeInfo]:
        return None if node.op == "root" else self._info(node)

    def _wrap(self, value: Any) -> Any:
        return fx.node.map_arg(value, self._info)

    def _downstream(self, base: NodeInfo) -> List[NodeInfo]:
        seen, frontier = set(), [base._node]
        while frontier:
            for user in frontier.pop().users:
                if user not in seen:
                    seen.add(user)
                    frontier.append(user)
        return [self._info(node) for node in self.graph.nodes if node in seen]


def _module_path(node: fx.Node) -> str:
    """The model's path of the module a ``call_module`` node calls (its target may be a per-call-site copy)."""
    stack = node.meta.get("nn_module_stack")
    return list(stack.values())[-1][0] if stack else str(node.target)


def _ancestors(node: fx.Node) -> set:
    seen, frontier = set(), [node]
    while frontier:
        for arg in frontier.pop().all_input_nodes:
            if arg not in seen:
                seen.add(arg)
                frontier.append(arg)
    return seen


def _owned_by(node: fx.Node, path: str) -> bool:
    if node.op == "call_module":
        return node.target == path or str(node.target).startswith(path + ".")
    stack = node.meta.get("nn_module_stack") or {}
    return any(entry[0] == path for entry in stack.values())


def cut_nodes(graph: fx.Graph) -> List[fx.Node]:
    """Nodes that every path from the inputs to the output passes through.

    Only nodes that depend on an input's values and feed the output count;
    constants (parameters, class tokens) and sizes (``aten.sym_size``) do not
    open other paths.
    """
    nodes = list(graph.nodes)
    live = input_dependent_nodes(graph) & _backward_reachable(nodes)
    order = [node for node in nodes if node in live]
    position = {node: i for i, node in enumerate(order)}
    # furthest[i]: the furthest position reached by an edge leaving positions < i
    furthest, reach = [], -1
    for node in order:
        furthest.append(reach)
        for user in node.users:
            if user in position:
                reach = max(reach, position[user])
    return [node for i, node in enumerate(order) if furthest[i] <= i and node.op not in ("placeholder", "output")]


def _backward_reachable(nodes: List[fx.Node]) -> set:
    reached = {node for node in nodes if node.op == "output"}
    for node in reversed(nodes):
        if any(user in reached for user in node.users):
            reached.add(node)
    return reached


_RESHAPES = frozenset(
    {torch.ops.aten.view, torch.ops.aten.reshape, torch.ops.aten._unsafe_view, torch.ops.aten.flatten}
)


def _reshape_packet(node: fx.Node) -> Optional[Any]:
    """The ATen reshape a ``call_function`` node calls (``view``, ``reshape``, ``flatten``), else ``None``."""
    packet = getattr(node.target, "overloadpacket", None) if node.op == "call_function" else None
    return packet if packet in _RESHAPES else None


def _is_token_sequence(node: fx.Node) -> bool:
    shape = getattr(node.meta.get("tensor_meta"), "shape", None)
    return shape is not None and len(shape) == 3


def _is_feature_map(node: fx.Node) -> bool:
    shape = getattr(node.meta.get("tensor_meta"), "shape", None)
    return shape is not None and len(shape) == 4 and shape[2] * shape[3] > 1


_ADAPTIVE_POOLS = frozenset({torch.ops.aten.adaptive_avg_pool2d, torch.ops.aten.adaptive_max_pool2d})


def _is_pooling(node: fx.Node) -> bool:
    """Adaptive pooling to a fixed grid, as a module, a rewritten function or an ATen call."""
    target = node.target
    if node.op == "call_module":
        module = node.graph.owning_module.get_submodule(node.target)
        if isinstance(module, (nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)):
            return True
        target = getattr(module, "fn", None)
    return getattr(target, "overloadpacket", None) in _ADAPTIVE_POOLS
