"""The two-tower retriever: sharded TorchRec embeddings, sampled softmax with logQ correction, faiss export.

Model / train task / inference wrapper are three classes:

| module        | what                                                                                   |
|---------------|----------------------------------------------------------------------------------------|
| config.py     | `RetrieverConfig` (model, loss, train, eval, index); YAML per dataset in `configs/`    |
| model.py      | `TwoTowerRetriever`: causal self-attention user tower, hashed-id + attribute item tower |
| loss.py       | sampled softmax: in-batch + uniform or a shared uniform pool, logQ (the formula)       |
| task.py       | `RetrievalTask` (model + loss, what DistributedModelParallel wraps), `CandidateSampler` |
| catalog.py    | `Catalog`: every retrievable item with its features and logq                           |
| data.py       | the shared reader (`features.reader.FeatureStore`) as the training loop's data source  |
| train.py      | `train_retriever`: sharded training, leave-one-out selection, DCP checkpoints          |
| evaluate.py   | full-ranking leave-one-out metrics with the history masked                             |
| index.py      | faiss HNSW / IVF / IVF-PQ per catalog-size tier, exact reference, recall vs exact     |
| export.py     | export directory + `load_retriever(path) -> RetrieverInference` (what serving loads)   |
| inference.py  | `RetrieverInference`: user_embedding(batch), item_embedding(kjt), search(vecs, k)     |

Entry point: `cascade train-retriever` (jobs/train_retriever.py).
"""
