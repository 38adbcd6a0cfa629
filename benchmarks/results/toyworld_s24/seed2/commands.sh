# convert (6 s)
python -m visor_hf.convert_llava_ov --src dense --dst visor --cross-attn-layers 1,3,5 --self-attn-layers 1,3,5 --no-progress
# stage1 (146 s)
python -m visor_hf.train stage1 --model visor --data data/train.jsonl --image_folder data --output_dir stage1 --max_steps 600 --learning_rate 0.001 --per_device_train_batch_size 16 --lr_scheduler_type cosine --warmup_steps 60 --logging_steps 25 --save_strategy no --report_to none --seed 2 --use_cpu --disable_tqdm true
# universal (836 s)
python -m visor_hf.train universal --model stage1 --data data/train.jsonl --image_folder data --output_dir universal --max_steps 3000 --learning_rate 0.0002 --per_device_train_batch_size 16 --lr_scheduler_type cosine --warmup_steps 100 --logging_steps 25 --save_strategy no --report_to none --seed 2 --use_cpu --disable_tqdm true
# search (17 s)
python -m visor_hf.train search --model universal --data data/val.jsonl --image_folder data --output_dir searched --batch_size 32
# pseudo-label (23 s)
python -m visor_hf.train pseudo-label --model searched --data data/label.jsonl --image_folder data --output labels.jsonl --batch_size 32 --group_by family
# router (24 s)
python -m visor_hf.train router --model searched --labels labels.jsonl --data data/label.jsonl --image_folder data --output_dir final --max_steps 300 --learning_rate 0.001 --per_device_train_batch_size 32 --lr_scheduler_type cosine --warmup_steps 30 --logging_steps 25 --save_strategy no --report_to none --seed 2 --use_cpu --disable_tqdm true
