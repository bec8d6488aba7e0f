@echo off
rem Three training sessions in a row (doc\CHAINING.md); the chain stops at the first session that fails.
rem Run it again after a crash or Ctrl-C: finished sessions are skipped, the interrupted one continues
rem exactly where its last save left it (--resume_run auto), and the rest follow.
cd /d "%~dp0"
python train.py --config chain0.json --resume_run auto || exit /b 1
python train.py --config chain1.json --resume_run auto || exit /b 1
python train.py --config chain2.json --resume_run auto || exit /b 1
