"""The metric of tests/eval/tasks/broken_local.yaml: it always fails."""


def explode(doc, results):
    raise RuntimeError("this task's metric is broken on purpose")
