"""The evaluate stage, by idea:

- medreason.evaluation.scoring: prediction rows, accuracy with Wilson intervals, headline numbers;
- medreason.evaluation.generation: prompts, KV-cache planning and batched greedy decoding;
- medreason.evaluation.loss: teacher-forced held-out loss;
- medreason.evaluation.stage: what to score, which model (medreason.loading), sharding over
  processes, and the outputs (medreason.report).
"""
