@echo off
rem Three training sessions in a row (doc\CHAINING.md); the chain stops at the first session that fails.
cd /d "%~dp0"
python train.py --config chain0.json || exit /b 1
python train.py --config chain1.json || exit /b 1
python train.py --config chain2.json || exit /b 1
