from edgeweave.training.loop import TrainResult, evaluate, fit

__all__ = ['TrainResult', 'evaluate', 'fit']
