"""The challenge's metrics, evaluation of prediction folders, ranking and the HTML report."""
