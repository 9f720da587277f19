"""The graph IR: typed nodes in a networkx graph, imported from and lowered back to torch.fx.

    from_fx(GraphModule) -> Graph -> canonicalize(Graph) -> passes rewrite (fused nodes hold ir.fused specs)
    -> compiler.lower builds the ops -> to_fx(Graph) -> GraphModule
"""
from ir.graph import Graph, Node
from ir.types import TensorType

__all__ = ["Graph", "Node", "TensorType"]
