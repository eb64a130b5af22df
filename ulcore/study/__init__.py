"""The paper's trends at tiny scale (`python -m flows.study`): settings and resume (plan), verdicts, report."""
