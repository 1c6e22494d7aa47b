"""LIMA's evaluation (§4): judging, counting and charting kept apart, so counting is testable with
any judge.

  verdicts.py   reading a judge's free-text answer (pairwise verdicts, grades, 1-6 ratings)
  judgments.py  sample files in, judgment files out (the cache), two orders -> one outcome
  judge.py      LLM judges over HTTP (the `openai` client): retries, re-asks, appending
  compare.py    `limajax compare`: both orders of every shared prompt
  rate.py       `limajax rate`: Fail / Pass / Excellent (§4.3) and the 1-6 scale (§5)
  human.py      `limajax annotate` (an HTML sheet) and `compare --human` (its labels)
  stats.py      win / tie / loss, bootstrap intervals, position bias, length split, agreement
  report.py     `limajax report`: Markdown, SUMMARY.json and the Figure-1 chart
"""
