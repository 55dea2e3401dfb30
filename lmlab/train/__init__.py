"""What only a training run needs: Lightning callbacks, the memorization guard, sweep summaries. The top lmlab layer."""
