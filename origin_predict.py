"""Show or measure the book's FCN trained by origin_train.py.

    python origin_predict.py               # pictures/origin_out.png: image / ground truth / prediction for 4 val images
    python origin_predict.py --eval        # full-resolution metrics over the whole val split, as JSON and a table
    python origin_predict.py --images photos/ --save-dir predictions   # NAME.png (class indices), NAME_overlay.jpg
"""
from support.cli import predict_arg_parser, run_main
from support.prediction import run_prediction


def main(argv: list[str] | None = None) -> None:
    p = predict_arg_parser(__doc__.splitlines()[0], "runs/origin/last.pt", "pictures/origin_out.png")
    run_prediction(p.parse_args(argv))


if __name__ == "__main__":
    run_main(main)
