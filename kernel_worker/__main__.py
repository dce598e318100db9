from kernel_worker.app import main

main()
