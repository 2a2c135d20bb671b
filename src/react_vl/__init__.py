"""react-vl: customized visual models with retrieval-augmented knowledge (REACT, CVPR 2023).

Each pipeline stage is one module with a plain Python entry point; `react_vl.cli` is a thin
layer over them:

    world      -> generate the offline mini world (webdataset shards)
    embed      -> corpus -> clip-retrieval embedding folder (the knowledge base)
    index      -> knowledge base -> tuned FAISS indexes
    retrieve   -> task class-name prompts -> retrieved pairs (parquet)
    materialize-> retrieved pairs -> training shards
    train      -> customize a CLIP model (gated blocks, locked-text, LiT, full)
    evaluate   -> zero-shot, retrieval and linear-probe evaluation, side by side
"""

__version__ = "0.1.0"
