"""`revcol compare`: compare MLflow runs side by side (differing params, final/best metrics, PNG curves).

What is compared ("subjects"):

* a *pipeline*: a parent run with child runs (one per stage, tag ``revcol.stage``, MLflow's
  ``mlflow.parentRunId``). Its stages are laid end to end on one step axis, in start-time order: the first stage's
  steps as logged, the next stage's steps shifted by the previous stage's last step, and so on. A stage's last step
  is the highest step of any metric it logged. Its params are the parent's, plus stage-only keys from the children
  (first stage wins). Metrics logged on the parent run itself are not used. The plots do not chain the stages:
  each kind of stage (``revcol.kind``) gets its own panel, where the stages of that kind of every subject are
  overlaid on one x axis (``--x steps|samples|epochs``), e.g. a finetune and its from-scratch baseline; eval stages
  are bars per weights kind (``raw``, ``ema``).
* a *run*: any run without child runs, its steps as logged.

Selection (combined as a union, in this order, duplicates dropped):

* ``--experiment NAME``: the experiment's top-level runs (pipelines and standalone runs);
* ``--parent RUN_ID``: the parent's child runs, each compared on its own;
* ``RUN_ID ...``: these runs (a parent run becomes a pipeline);
* ``--stage NAME`` narrows experiment/parent selections to runs whose ``revcol.stage`` tag is NAME.

Final and best values. Final is the value at the highest (laid-out) step. Best follows one rule,
:func:`metric_direction`, on the metric's last path component: names starting with ``top1``/``top5``/``acc`` and
``samples_per_s`` are maximized; names containing ``loss`` and ``stall_frac`` are minimized; everything else
(``lr``, ``grad_norm``, counters) has no best. NaN values never count as best.

Only stdlib is imported at module level, in every module of the package: ``revcol --help`` must not pay for
importing MLflow or matplotlib.

Modules: ``selection`` (finding the runs in MLflow, reading their params and metric histories into
``subjects``), ``summary`` (differing params, final and best values, the direction rule), ``plots`` (PNG
curves), ``comparison`` (:func:`compare_runs`, the whole comparison), ``table`` (the table's rows and the text
table), ``report`` (the self-contained HTML report of ``--html``), ``command`` (``revcol compare``).

"""

from pipeline.compare.command import add_parser
from pipeline.compare.comparison import DEFAULT_METRICS, Comparison, compare_runs
from pipeline.compare.plots import X_AXES, plot_metric
from pipeline.compare.report import render_html, write_html_report
from pipeline.compare.selection import CompareError, load_subjects, select_runs
from pipeline.compare.subjects import Subject
from pipeline.compare.summary import differing_params, metric_direction, summarize_metrics
from pipeline.compare.table import format_table, table_rows

__all__ = [
    "DEFAULT_METRICS",
    "X_AXES",
    "Comparison",
    "CompareError",
    "Subject",
    "add_parser",
    "compare_runs",
    "differing_params",
    "format_table",
    "load_subjects",
    "metric_direction",
    "plot_metric",
    "render_html",
    "select_runs",
    "summarize_metrics",
    "table_rows",
    "write_html_report",
]
